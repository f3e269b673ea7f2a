//! A real S3-compatible server for tests: moto's, from the project `.venv`, on a free loopback port, killed
//! when dropped (and by the kernel if the test process dies first).

use super::repo;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `moto_server`, killed (and reaped) on drop, and by the kernel if this process dies first.
pub struct Moto {
    child: Child,
    port: u16,
    /// Holds the server's log.
    dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on (at the moment of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Moto {
    /// Starts a server and waits until it accepts connections. The port is picked by binding port 0 and
    /// letting go of it, so another process may take it first; a server that exits at start-up is retried
    /// on a fresh port.
    pub fn start() -> Moto {
        let mut last = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
            let mut cmd = Command::new(repo().join(".venv/bin/moto_server"));
            // Should this test process be killed outright (so no `Drop` runs), the kernel kills the server.
            // SAFETY: `prctl` is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                // A file, not a pipe: nobody reads the log while the server runs, and a full pipe would stall it.
                .stderr(log)
                .spawn()
                .expect("moto_server starts (make setup installs it into .venv)");
            let mut server = Moto { child, port, dir };
            match server.wait_ready(Duration::from_secs(60)) {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("moto_server did not start: {last}");
    }

    /// Polls until the server accepts a connection; `Err` if it exits first. Panics past `limit`.
    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("it exited with {status}; its log:\n{}", self.log()));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "moto_server did not listen within {limit:?}; its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket with a plain, unsigned `PUT /BUCKET` (moto does not check signatures).
    pub fn create_bucket(&self, bucket: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let status = response.lines().next().unwrap_or_default();
        assert!(status.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {status}\n{response}");
    }
}

/// Object-store options for the server at `endpoint` (explicit, so the environment does not matter).
pub fn s3_options(endpoint: &str) -> Vec<(String, String)> {
    [
        ("endpoint", endpoint),
        ("allow_http", "true"),
        ("access_key_id", "test"),
        ("secret_access_key", "test"),
        ("region", "us-east-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}
