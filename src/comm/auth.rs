//! Connection authentication by a per-run secret: challenge and response with HMAC-SHA256, so the secret
//! never crosses the wire and a stray or hostile connection is refused before it can send anything else.
//!
//! The accepting side sends a random 32-byte nonce; the connecting side answers with
//! `HMAC-SHA256(secret, label || nonce)`; the acceptor compares in constant time. `label` separates uses
//! (rendezvous, ring links) so a response for one cannot be replayed for another.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};

type HmacSha256 = Hmac<Sha256>;

/// A fresh random secret for a run, as 64 hex digits.
pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn tag(secret: &[u8], label: &[u8], nonce: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(nonce);
    mac
}

/// Acceptor side: challenges the peer and checks its answer.
///
/// # Errors
/// `PermissionDenied` when the answer is wrong; I/O errors from the stream.
pub fn challenge<S: Read + Write>(stream: &mut S, secret: &[u8], label: &[u8]) -> std::io::Result<()> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    stream.write_all(&nonce)?;
    stream.flush()?;
    let mut answer = [0u8; 32];
    stream.read_exact(&mut answer)?;
    tag(secret, label, &nonce).verify_slice(&answer).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, "peer failed authentication (wrong run secret)")
    })
}

/// Connector side: answers the acceptor's challenge.
///
/// # Errors
/// I/O errors from the stream.
pub fn respond<S: Read + Write>(stream: &mut S, secret: &[u8], label: &[u8]) -> std::io::Result<()> {
    let mut nonce = [0u8; 32];
    stream.read_exact(&mut nonce)?;
    stream.write_all(&tag(secret, label, &nonce).finalize().into_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn run(server_secret: &str, client_secret: &str) -> std::io::Result<()> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let client_secret = client_secret.to_string();
        let c = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            respond(&mut s, client_secret.as_bytes(), b"test").unwrap();
        });
        let (mut s, _) = l.accept().unwrap();
        let r = challenge(&mut s, server_secret.as_bytes(), b"test");
        c.join().unwrap();
        r
    }

    #[test]
    fn the_right_secret_is_accepted_and_a_wrong_one_refused() {
        let secret = new_secret();
        assert_eq!(secret.len(), 64);
        run(&secret, &secret).unwrap();
        let err = run(&secret, &new_secret()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    }
}
