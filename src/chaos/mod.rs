//! Fault injection: named failpoints in the code paths whose recovery Tessera claims, armed from the
//! environment so that tests and the chaos harness can fail a real process at an exact stage.
//!
//! `TESSERA_FAILPOINTS` holds `name=action` pairs separated by `;`, for example
//! `ckpt.commit.before_manifest=kill;ckpt.write=error`. Actions:
//! - `error`: the failpoint returns an I/O error, as a full disk or a failing device would;
//! - `kill`: the process sends itself SIGKILL there, as `kill -9` or a power cut would;
//! - `sleep(MS)`: it stalls for MS milliseconds, as a slow disk would.
//!
//! `@N` after an action arms it for the N-th time the failpoint is reached in this process only
//! (`ckpt.write=kill@2`: the second checkpoint's write dies, the first commits).
//!
//! Unarmed failpoints cost one lookup in a map built once per process. Failpoints in use:
//!
//! | name                            | where                                                         |
//! |---------------------------------|---------------------------------------------------------------|
//! | `ckpt.write`                    | a rank's writer, before it writes its file                    |
//! | `ckpt.before_ack`               | a rank's writer, file durable, before it votes                |
//! | `ckpt.commit.before_manifest`   | the coordinator, all votes in, before the manifest            |
//! | `ckpt.commit.before_latest`     | the coordinator, checkpoint published, before `latest` moves  |
//! | `worker.start`, `worker.start.rankR` | a worker process (rank R), before it joins the rendezvous |

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// What an armed failpoint does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Error,
    Kill,
    Sleep(Duration),
}

/// An armed failpoint: its action, the hit it fires on (every hit when `None`), and the hits so far.
#[derive(Debug)]
pub struct Armed {
    pub action: Action,
    pub on_hit: Option<u64>,
    hits: AtomicU64,
}

/// Parses a `TESSERA_FAILPOINTS` value.
///
/// # Errors
/// A message naming the entry that is not `name=error|kill|sleep(MS)`, optionally followed by `@N`.
pub fn parse(spec: &str) -> Result<HashMap<String, Armed>, String> {
    let mut out = HashMap::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || format!("failpoint {entry:?} is not NAME=error, NAME=kill or NAME=sleep(MS), optionally @N");
        let (name, action) = entry.split_once('=').ok_or_else(bad)?;
        let (action, on_hit) = match action.split_once('@') {
            Some((a, n)) => (a, Some(n.trim().parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(bad)?)),
            None => (action, None),
        };
        let action = match action.trim() {
            "error" => Action::Error,
            "kill" => Action::Kill,
            a => {
                let ms = a.strip_prefix("sleep(").and_then(|r| r.strip_suffix(')')).ok_or_else(bad)?;
                Action::Sleep(Duration::from_millis(ms.parse().map_err(|_| bad())?))
            }
        };
        out.insert(name.trim().to_string(), Armed { action, on_hit, hits: AtomicU64::new(0) });
    }
    Ok(out)
}

fn armed() -> &'static HashMap<String, Armed> {
    static ARMED: OnceLock<HashMap<String, Armed>> = OnceLock::new();
    ARMED.get_or_init(|| match std::env::var("TESSERA_FAILPOINTS") {
        Ok(spec) => parse(&spec).unwrap_or_else(|e| {
            eprintln!("tessera: ignoring TESSERA_FAILPOINTS: {e}");
            HashMap::new()
        }),
        Err(_) => HashMap::new(),
    })
}

/// Runs failpoint `name`: nothing unless armed.
///
/// # Errors
/// The injected I/O error when armed with `error`.
pub fn failpoint(name: &str) -> std::io::Result<()> {
    let Some(armed) = armed().get(name) else { return Ok(()) };
    let hit = armed.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if armed.on_hit.is_some_and(|n| n != hit) {
        return Ok(());
    }
    match &armed.action {
        Action::Error => Err(std::io::Error::other(format!("injected failure at failpoint {name}"))),
        Action::Kill => {
            eprintln!("tessera: failpoint {name}: killing this process");
            // SAFETY: sending a signal to ourselves has no memory-safety preconditions.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!("SIGKILL cannot be caught")
        }
        Action::Sleep(d) => {
            std::thread::sleep(*d);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_parses_into_actions_and_bad_entries_are_named() {
        let m = parse("a=error; b=kill@2;c=sleep(25)").unwrap();
        assert_eq!((&m["a"].action, m["a"].on_hit), (&Action::Error, None));
        assert_eq!((&m["b"].action, m["b"].on_hit), (&Action::Kill, Some(2)));
        assert_eq!(m["c"].action, Action::Sleep(Duration::from_millis(25)));
        assert!(parse("a=explode").unwrap_err().contains("\"a=explode\""));
        assert!(parse("nameonly").is_err());
        assert!(parse("a=kill@0").is_err());
    }
}
