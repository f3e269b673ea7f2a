//! Fault injection: named failpoints in the code paths whose recovery Tessera claims, armed from the
//! environment so that tests and the chaos harness ([`harness`], with its [`schedule`]) can fail a real
//! process at an exact stage.
//!
//! `TESSERA_FAILPOINTS` holds `name=action` pairs separated by `;`, for example
//! `ckpt.commit.before_manifest=kill;ckpt.write=error`. Actions:
//! - `error`: the failpoint returns an I/O error, as a full disk or a failing device would;
//! - `kill`: the process sends itself SIGKILL there, as `kill -9` or a power cut would;
//! - `sleep(MS)`: it stalls for MS milliseconds, as a slow disk would;
//! - `scale(F)` and `nan`: for numeric failpoints ([`factor`]), a value is multiplied by F, or becomes NaN,
//!   as a bad learning rate or a faulty device's arithmetic would;
//! - `outage(MS)@after(OTHER)`: every hit fails, in every process of the run (the launcher's included), for
//!   MS milliseconds from when failpoint `OTHER` first fired on any rank, as storage that stops answering
//!   would; before and after that window it passes.
//!
//! `@N` after an action arms it for the N-th time the failpoint is reached in this process only
//! (`ckpt.write=kill@2`: the second checkpoint's write dies, the first commits). `@once` arms it for the
//! first time it is reached in the whole run, across restarted processes: when `TESSERA_CHAOS_STATE` names
//! a directory, firing leaves a marker file there and later processes pass over the failpoint (without it,
//! `@once` means once per process). In a launched gang the markers are per rank (each rank process carries
//! `TESSERA_RANK`), so a failpoint every rank reaches (`train.lr.step12`) fires once on each of them, as a
//! gang-wide fault must. `@after(OTHER)` fires once too, and only after failpoint `OTHER` has fired on the
//! same rank (its marker exists): `worker.start.rank1=error@after(train.step.rank1.step12)` makes rank 1 fail to
//! start after it was killed at step 12.
//!
//! Unarmed failpoints cost one lookup in a map built once per process. Failpoints in use:
//!
//! | name                            | where                                                         |
//! |---------------------------------|---------------------------------------------------------------|
//! | `ckpt.write`                    | a rank's writer, before it writes its file                    |
//! | `ckpt.before_ack`               | a rank's writer, file durable, before it votes                |
//! | `ckpt.no_vote`                  | a rank's writer whose write failed, before it votes "no" (`error`: the vote is lost, as on a full disk) |
//! | `ckpt.commit.before_manifest`   | the coordinator, all votes in, before the manifest            |
//! | `ckpt.commit.before_latest`     | the coordinator, checkpoint published, before `latest` moves  |
//! | `worker.start`, `worker.start.rankR` | a worker process (rank R), before it joins the rendezvous |
//! | `train.lr.stepS` (numeric)      | the learning rate of 0-based step S                           |
//! | `train.grad.rankR.stepS` (numeric) | rank R's local gradient at step S, before averaging        |
//! | `train.step.rankR.stepS`        | rank R at the start of step S (`kill`, `sleep`: a hang or a straggler) |
//! | `train.break.rankR.stepS`       | rank R at step S drops its connections to its ring neighbours |
//! | `train.oom.rankR.stepS`         | `error`: rank R's forward/backward at step S fails as out of memory would (a libtorch OOM error, through the same path as a real one). Checked at every attempt of the step: `error` fails every attempt (with `micro_batch = "auto"` the size halves down to 1, then the run fails), `error@once` only the first (one halving) |
//! | `train.kill_launcher.stepS`     | rank 0 at step S: `kill` kills the launcher (its parent)      |
//! | `ckpt.write.rankR.stepK`        | rank R's writer, for the checkpoint after step K              |
//! | `ckpt.corrupt.stepK`            | the coordinator, after committing step K: truncates rank 0's file (local store); with `kill`, then kills its process |
//! | `ckpt.store`                    | every request to the checkpoint store (listing, loading, writing, voting, committing), in every process: `outage(MS)` makes the store unavailable |

pub mod harness;
pub mod schedule;

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
    Scale(f64),
    Nan,
    /// Fails every hit during a window after another failpoint fired (see the module doc).
    Outage(Duration),
}

/// An armed failpoint: its action, the hit it fires on (every hit when `None`), and the hits so far.
#[derive(Debug)]
pub struct Armed {
    pub action: Action,
    pub on_hit: Option<u64>,
    /// Fires once per run (see the module doc).
    pub once: bool,
    /// Fires only after this failpoint has fired.
    pub after: Option<String>,
    /// Names its once-marker: the failpoint's name, with its condition when it has one (a name may be armed
    /// several times under different conditions).
    key: String,
    hits: AtomicU64,
}

/// Parses a `TESSERA_FAILPOINTS` value.
///
/// # Errors
/// A message naming the entry that is not `name=error|kill|sleep(MS)|scale(F)|nan`, optionally followed by
/// `@N` or `@once`.
pub fn parse(spec: &str) -> Result<HashMap<String, Vec<Armed>>, String> {
    let mut out = HashMap::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || {
            format!(
                "failpoint {entry:?} is not NAME=error, NAME=kill, NAME=sleep(MS), NAME=scale(F), NAME=nan or \
                 NAME=outage(MS)@after(OTHER), optionally @N, @once or @after(OTHER)"
            )
        };
        let (name, action) = entry.split_once('=').ok_or_else(bad)?;
        let (action, on_hit, once, after) = match action.split_once('@') {
            Some((a, "once")) => (a, None, true, None),
            Some((a, cond)) if cond.starts_with("after(") => {
                let other = cond.strip_prefix("after(").and_then(|r| r.strip_suffix(')')).ok_or_else(bad)?;
                (a, None, true, Some(other.trim().to_string()))
            }
            Some((a, n)) => (a, Some(n.trim().parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(bad)?), false, None),
            None => (action, None, false, None),
        };
        let arg = |prefix: &str| action.trim().strip_prefix(prefix).and_then(|r| r.strip_suffix(')'));
        let action = match action.trim() {
            "error" => Action::Error,
            "kill" => Action::Kill,
            "nan" => Action::Nan,
            _ => {
                if let Some(ms) = arg("sleep(") {
                    Action::Sleep(Duration::from_millis(ms.parse().map_err(|_| bad())?))
                } else if let Some(ms) = arg("outage(") {
                    if after.is_none() {
                        return Err(format!("failpoint {entry:?}: outage(MS) needs @after(OTHER), where it starts"));
                    }
                    Action::Outage(Duration::from_millis(ms.parse().map_err(|_| bad())?))
                } else if let Some(f) = arg("scale(") {
                    Action::Scale(f.parse::<f64>().ok().filter(|f| f.is_finite()).ok_or_else(bad)?)
                } else {
                    return Err(bad());
                }
            }
        };
        let name = name.trim().to_string();
        let key = match &after {
            Some(other) => format!("{name}+after({other})"),
            None => name.clone(),
        };
        let armed = Armed { action, on_hit, once, after, key, hits: AtomicU64::new(0) };
        out.entry(name).or_insert_with(Vec::new).push(armed);
    }
    Ok(out)
}

/// Whether any failpoint is armed in this process (lets hot loops skip building failpoint names).
pub fn any_armed() -> bool {
    !armed().is_empty()
}

/// Whether this process was started by `tessera chaos` (whose launchers, nodes included, all run on this
/// machine).
pub fn under_harness() -> bool {
    state_dir().is_some()
}

/// Where `@once` markers live, if anywhere (`TESSERA_CHAOS_STATE`).
fn state_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("TESSERA_CHAOS_STATE").map(std::path::PathBuf::from)
}

/// The marker a `@once` failpoint leaves when it fires (on this rank, in a gang); its modification time is
/// when it fired.
pub fn marker(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    match std::env::var("TESSERA_RANK") {
        Ok(rank) => dir.join(format!("fired-{name}@rank{rank}")),
        Err(_) => dir.join(format!("fired-{name}")),
    }
}

/// When failpoint `name` first fired on any rank (the earliest of its markers), as Unix seconds.
pub fn first_fired(dir: &std::path::Path, name: &str) -> Option<f64> {
    let exact = format!("fired-{name}");
    let ranked = format!("fired-{name}@rank");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n == exact || n.starts_with(&ranked)))
        .filter_map(|e| e.metadata().ok()?.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
        .reduce(f64::min)
}

/// The first of `name`'s armings that fires on this hit.
fn firing(name: &str) -> Option<&'static Armed> {
    armed().get(name)?.iter().find(|a| fires(a))
}

/// Whether an armed failpoint fires on this hit.
fn fires(armed: &Armed) -> bool {
    if let Action::Outage(d) = armed.action {
        let (Some(dir), Some(other)) = (state_dir(), &armed.after) else { return false };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |t| t.as_secs_f64());
        return first_fired(&dir, other).is_some_and(|from| now >= from && now < from + d.as_secs_f64());
    }
    if let Some(other) = &armed.after {
        let Some(dir) = state_dir() else { return false };
        if !marker(&dir, other).exists() {
            return false;
        }
    }
    let hit = armed.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if armed.on_hit.is_some_and(|n| n != hit) {
        return false;
    }
    if armed.once {
        if hit > 1 {
            return false;
        }
        if let Some(dir) = state_dir() {
            let _ = std::fs::create_dir_all(&dir);
            // Whoever creates the marker fires; everyone after passes.
            if std::fs::OpenOptions::new().write(true).create_new(true).open(marker(&dir, &armed.key)).is_err() {
                return false;
            }
        }
    }
    true
}

/// Whether failpoint `name` fires now, for sites that carry the fault out themselves (dropping
/// connections, corrupting a file, killing the launcher).
pub fn fired(name: &str) -> bool {
    fire(name).is_some()
}

/// [`fired`], returning the armed action for the site to carry out its way.
pub fn fire(name: &str) -> Option<Action> {
    firing(name).map(|a| a.action.clone())
}

/// Runs numeric failpoint `name`: the factor to apply to the value it guards (NaN for `nan`), or `None`
/// when not armed or not firing. Other actions are carried out as by [`failpoint`] and give `None`.
pub fn factor(name: &str) -> Option<f64> {
    match &firing(name)?.action {
        Action::Scale(f) => Some(*f),
        Action::Nan => Some(f64::NAN),
        other => {
            crate::say!("tessera: failpoint {name}: {other:?} is not a numeric action; ignored");
            None
        }
    }
}

fn armed() -> &'static HashMap<String, Vec<Armed>> {
    static ARMED: OnceLock<HashMap<String, Vec<Armed>>> = OnceLock::new();
    ARMED.get_or_init(|| match std::env::var("TESSERA_FAILPOINTS") {
        Ok(spec) => parse(&spec).unwrap_or_else(|e| {
            crate::say!("tessera: ignoring TESSERA_FAILPOINTS: {e}");
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
    let Some(armed) = firing(name) else { return Ok(()) };
    match &armed.action {
        Action::Error => Err(std::io::Error::other(format!("injected failure at failpoint {name}"))),
        Action::Kill => {
            crate::say!("tessera: failpoint {name}: killing this process");
            // SAFETY: sending a signal to ourselves has no memory-safety preconditions.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!("SIGKILL cannot be caught")
        }
        Action::Sleep(d) => {
            std::thread::sleep(*d);
            Ok(())
        }
        Action::Outage(_) => Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("injected storage outage at failpoint {name}"),
        )),
        Action::Scale(_) | Action::Nan => Ok(()), // numeric: see `factor`
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_parses_into_actions_and_bad_entries_are_named() {
        let m = parse("a=error; b=kill@2;c=sleep(25)").unwrap();
        assert_eq!((&m["a"][0].action, m["a"][0].on_hit), (&Action::Error, None));
        assert_eq!((&m["b"][0].action, m["b"][0].on_hit), (&Action::Kill, Some(2)));
        assert_eq!(m["c"][0].action, Action::Sleep(Duration::from_millis(25)));
        assert!(parse("a=explode").unwrap_err().contains("\"a=explode\""));
        assert!(parse("nameonly").is_err());
        assert!(parse("a=kill@0").is_err());
        assert!(parse("ckpt.store=outage(5000)").unwrap_err().contains("needs @after"));
        let m = parse("ckpt.store=outage(5000)@after(train.step.rank0.step9)").unwrap();
        assert_eq!(m["ckpt.store"][0].action, Action::Outage(Duration::from_secs(5)));
        let m = parse("x=scale(100)@once;y=nan").unwrap();
        assert_eq!((&m["x"][0].action, m["x"][0].once), (&Action::Scale(100.0), true));
        assert_eq!(m["y"][0].action, Action::Nan);
        assert!(parse("x=scale(inf)").is_err());
        let m = parse("w=error@after(train.step.rank1.step3)").unwrap();
        assert_eq!((m["w"][0].once, m["w"][0].after.as_deref()), (true, Some("train.step.rank1.step3")));
        // One name armed twice under different conditions keeps both, with their own once-markers.
        let m = parse("s=error@after(a);s=error@after(b)").unwrap();
        assert_eq!(m["s"].len(), 2);
        assert_ne!(m["s"][0].key, m["s"][1].key);
    }
}
