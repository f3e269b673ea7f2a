//! Connection set-up for [`TcpRing`](super::TcpRing): connecting to `next` and accepting `prev` at the same
//! time, authenticating each link both ways with the run secret, and exchanging (rank, world); see "Wiring"
//! in the parent module's doc. The collectives that run over the resulting `Links` live in the parent.

use super::{wait_readable, Links, FOREVER, POLL_SLICE};
use crate::comm::{auth, CommError};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Labels for the two directions of a link's authentication (see `auth`).
const LABEL_CONNECTOR: &[u8] = b"tessera-ring/connector";
const LABEL_ACCEPTOR: &[u8] = b"tessera-ring/acceptor";
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 0;

/// Pause between attempts to connect to a peer that is not listening yet.
const RETRY: Duration = Duration::from_millis(20);

/// Why one side of the set-up ended without a link.
enum Failure {
    /// The other side failed first and asked this one to stop; its reason is the one reported.
    Stopped,
    Failed(String),
}

/// Connects to `next` and accepts `prev` at the same time (each side's handshake waits on the other
/// rank's opposite side, so doing them one after the other around a ring would deadlock).
pub(super) fn link_up(
    rank: usize,
    world: usize,
    listener: &TcpListener,
    peers: &[SocketAddr],
    secret: &[u8],
    timeout: Duration,
) -> Result<Links, CommError> {
    let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
    let now = Instant::now();
    let stop = AtomicBool::new(false);
    let side =
        Side { rank, world, secret, timeout, deadline: now.checked_add(timeout).unwrap_or(now + FOREVER), stop: &stop };
    let finish = |r: Result<TcpStream, Failure>| {
        if r.is_err() {
            stop.store(true, Ordering::SeqCst);
        }
        r
    };
    let (outbound, inbound) = std::thread::scope(|s| {
        let inbound = s.spawn(|| finish(side.accept_from(prev, peers[prev], listener)));
        let outbound = finish(side.connect_to(next, peers[next]));
        let inbound = inbound.join().unwrap_or_else(|_| Err(Failure::Failed("the accepting thread panicked".into())));
        (outbound, inbound)
    });
    match (outbound, inbound) {
        (Ok(next_stream), Ok(prev_stream)) => {
            for s in [&next_stream, &prev_stream] {
                s.set_nonblocking(true).map_err(|e| CommError::Setup(format!("rank {rank}: {e}")))?;
            }
            Ok(Links { next: next_stream, prev: prev_stream, next_rank: next, prev_rank: prev })
        }
        (o, i) => {
            let reasons: Vec<String> = [o.err(), i.err()]
                .into_iter()
                .flatten()
                .filter_map(|f| match f {
                    Failure::Failed(s) => Some(s),
                    Failure::Stopped => None,
                })
                .collect();
            Err(CommError::Setup(format!("rank {rank} of {world}: {}", reasons.join("; "))))
        }
    }
}

/// What both set-up threads share.
struct Side<'a> {
    rank: usize,
    world: usize,
    secret: &'a [u8],
    timeout: Duration,
    deadline: Instant,
    /// Set by whichever side fails first, so the other gives up instead of waiting out the deadline.
    stop: &'a AtomicBool,
}

impl Side<'_> {
    fn connect_to(&self, peer: usize, addr: SocketAddr) -> Result<TcpStream, Failure> {
        let mut last: Option<io::Error> = None;
        let stream = loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err(Failure::Stopped);
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = last.map_or_else(|| "no attempt finished".to_string(), |e| e.to_string());
                let timeout = self.timeout;
                return Err(Failure::Failed(format!(
                    "could not connect to rank {peer} at {addr} within {timeout:?} (last error: {why})"
                )));
            }
            match TcpStream::connect_timeout(&addr, left.min(POLL_SLICE * 10)) {
                Ok(s) => break s,
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(RETRY.min(self.deadline.saturating_duration_since(Instant::now())));
                }
            }
        };
        let what = format!("rank {peer} at {addr}");
        let io = |e: io::Error| self.io_failure(&format!("authenticating with {what}"), e);
        let _ = stream.set_nodelay(true);
        let mut g = Guarded { s: &stream, side: self };
        auth::respond(&mut g, self.secret, LABEL_CONNECTOR).map_err(io)?;
        if read_byte(&mut g).map_err(io)? == REFUSED {
            return Err(Failure::Failed(format!("{what} refused this rank's authentication: wrong run secret")));
        }
        match auth::challenge(&mut g, self.secret, LABEL_ACCEPTOR) {
            Ok(()) => g.write_all(&[ACCEPTED]).map_err(io)?,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                let _ = g.write_all(&[REFUSED]);
                return Err(Failure::Failed(format!("{what} failed authentication: wrong run secret")));
            }
            Err(e) => return Err(io(e)),
        }
        self.exchange_ids(&mut g, peer, &what)?;
        Ok(stream)
    }

    fn accept_from(&self, peer: usize, peer_addr: SocketAddr, listener: &TcpListener) -> Result<TcpStream, Failure> {
        let here = listener.local_addr().map_or_else(|_| "this rank's listener".to_string(), |a| a.to_string());
        listener.set_nonblocking(true).map_err(|e| Failure::Failed(format!("listener {here}: {e}")))?;
        let (stream, from) = loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err(Failure::Stopped);
            }
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        let timeout = self.timeout;
                        return Err(Failure::Failed(format!(
                            "rank {peer} (listening at {peer_addr}) did not connect to {here} within {timeout:?}"
                        )));
                    }
                    wait_readable(listener.as_raw_fd(), left.min(POLL_SLICE));
                }
                Err(e) => return Err(Failure::Failed(format!("accepting on {here}: {e}"))),
            }
        };
        let what = format!("the connection from {from} (expected rank {peer})");
        let io = |e: io::Error| self.io_failure(&format!("authenticating {what}"), e);
        stream.set_nonblocking(false).map_err(io)?;
        let _ = stream.set_nodelay(true);
        let mut g = Guarded { s: &stream, side: self };
        match auth::challenge(&mut g, self.secret, LABEL_CONNECTOR) {
            Ok(()) => g.write_all(&[ACCEPTED]).map_err(io)?,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                let _ = g.write_all(&[REFUSED]);
                return Err(Failure::Failed(format!("{what} failed authentication: wrong run secret")));
            }
            Err(e) => return Err(io(e)),
        }
        auth::respond(&mut g, self.secret, LABEL_ACCEPTOR).map_err(io)?;
        if read_byte(&mut g).map_err(io)? == REFUSED {
            return Err(Failure::Failed(format!("{what} refused this rank's authentication: wrong run secret")));
        }
        self.exchange_ids(&mut g, peer, &what)?;
        Ok(stream)
    }

    /// Swaps (rank, world) with an authenticated peer and checks it is the one expected.
    fn exchange_ids(&self, g: &mut Guarded<'_>, peer: usize, what: &str) -> Result<(), Failure> {
        let io = |e: io::Error| self.io_failure(&format!("exchanging ranks with {what}"), e);
        let mut mine = [0u8; 16];
        mine[..8].copy_from_slice(&(self.rank as u64).to_le_bytes());
        mine[8..].copy_from_slice(&(self.world as u64).to_le_bytes());
        g.write_all(&mine).map_err(io)?;
        let mut theirs = [0u8; 16];
        g.read_exact(&mut theirs).map_err(io)?;
        let their_rank = u64::from_le_bytes(theirs[..8].try_into().expect("8 bytes"));
        let their_world = u64::from_le_bytes(theirs[8..].try_into().expect("8 bytes"));
        if their_world != self.world as u64 {
            return Err(Failure::Failed(format!(
                "{what} is in a world of {their_world}, this rank in one of {}",
                self.world
            )));
        }
        if their_rank != peer as u64 {
            return Err(Failure::Failed(format!("{what} is rank {their_rank}, not rank {peer}")));
        }
        Ok(())
    }

    fn io_failure(&self, context: &str, e: io::Error) -> Failure {
        if self.stop.load(Ordering::SeqCst) {
            return Failure::Stopped;
        }
        match e.kind() {
            io::ErrorKind::TimedOut => Failure::Failed(format!("{context}: no answer within {:?}", self.timeout)),
            io::ErrorKind::UnexpectedEof => Failure::Failed(format!(
                "{context}: the peer closed the connection (a different run secret, or it failed)"
            )),
            _ => Failure::Failed(format!("{context}: {e}")),
        }
    }
}

/// A blocking set-up stream whose reads and writes wake every [`POLL_SLICE`] to honour the set-up deadline
/// and the other side's stop request.
struct Guarded<'a> {
    s: &'a TcpStream,
    side: &'a Side<'a>,
}

impl Guarded<'_> {
    /// The timeout for the next blocking attempt, or why there is none.
    fn slice(&self) -> io::Result<Duration> {
        if self.side.stop.load(Ordering::SeqCst) {
            return Err(io::Error::other("stopped"));
        }
        let left = self.side.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        Ok(left.min(POLL_SLICE))
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Read for Guarded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.s.set_read_timeout(Some(self.slice()?))?;
            match (&mut &*self.s).read(buf) {
                Err(e) if would_block(&e) => continue,
                r => return r,
            }
        }
    }
}

impl Write for Guarded<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.s.set_write_timeout(Some(self.slice()?))?;
            match (&mut &*self.s).write(buf) {
                Err(e) if would_block(&e) => continue,
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_byte(g: &mut Guarded<'_>) -> io::Result<u8> {
    let mut b = [0u8; 1];
    g.read_exact(&mut b)?;
    Ok(b[0])
}
