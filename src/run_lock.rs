//! One process at a time per run directory.
//!
//! `tessera train` and node 0's `tessera launch` hold an exclusive advisory lock (`flock`) on
//! `run_dir/.tessera.lock` for their whole life. A second one on the same directory (a run started twice, a
//! scheduler's requeue while the first job still runs) is refused at once instead of training beside the
//! first: both would resume from the same checkpoint, append to the same ledgers and prune each other's
//! checkpoints. The kernel drops the lock when the process ends, however it ends (SIGKILL included), so a
//! crash never leaves a stale lock behind; the file is opened close-on-exec, so worker processes do not hold
//! it. The file holds the holder's pid, host and start time, for the message.

use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock's file name inside the run directory.
pub const LOCK_FILE: &str = ".tessera.lock";

/// Why a run directory could not be taken. `InUse` is the user's to resolve (exit code 2, never restarted);
/// `Io` is the directory itself failing.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "run_dir {dir} is in use by another tessera process ({holder}); stop that one first, or give this run \
         another run_dir"
    )]
    InUse { dir: PathBuf, holder: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes `run_dir` (creating it) for this process.
    ///
    /// # Errors
    /// [`LockError::InUse`] naming the holder, or [`LockError::Io`].
    pub fn acquire(run_dir: &Path) -> Result<RunLock, LockError> {
        let path = run_dir.join(LOCK_FILE);
        let io = |source| LockError::Io { path: path.clone(), source };
        std::fs::create_dir_all(run_dir).map_err(|source| LockError::Io { path: run_dir.to_path_buf(), source })?;
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(e));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = if holder.trim().is_empty() { "pid unknown".into() } else { holder.trim().to_string() };
            return Err(LockError::InUse { dir: run_dir.to_path_buf(), holder });
        }
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let me =
            format!("pid {} on {}, since {since} (Unix time)\n", std::process::id(), crate::launch::worker::hostname());
        file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(me.as_bytes())).map_err(io)?;
        Ok(RunLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_the_lock_is_free_again_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let first = RunLock::acquire(&run).unwrap();
        let e = RunLock::acquire(&run).unwrap_err();
        assert!(matches!(&e, LockError::InUse { .. }), "{e}");
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        RunLock::acquire(&run).unwrap();
    }
}
