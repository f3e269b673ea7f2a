//! The checkpoint coordinator: phase two of the two-phase commit, beside the leader rank.
//!
//! For each checkpoint the leader hands it a [`CommitJob`]. It waits for every rank's vote in the stage
//! ([`CkptStore::read_acks`]), and once all are in and all say yes it builds the manifest's file list from
//! them, writes the manifest last, publishes the checkpoint and moves `latest` ([`CkptStore::commit`]), then
//! applies the retention policy ([`crate::ckpt::retention::plan`]). Votes travel through the checkpoint
//! storage itself, so the coordinator needs no channel to the other ranks: whatever storage the ranks can
//! write, it can read, on one node or many.
//!
//! Failure meaning: a "no" vote, a deadline passing or a storage error abandons that checkpoint (its stage is
//! deleted) and is reported as [`CkptEvent::Abandoned`]; training goes on, and the previous checkpoint stays
//! the latest. A crash of the process at any point leaves the old checkpoint or the new one, never a mixture;
//! the leftovers are removed at the next start ([`CkptStore::cleanup`]).

use super::ckpt_writer::{CkptEvent, CommitJob, LocalVotes};
use crate::ckpt::manifest::{checkpoint_name, FileEntry, Manifest};
use crate::ckpt::retention::{self, CheckpointInfo, RetentionAction, RetentionPolicy};
use crate::ckpt::store::CkptStore;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct CoordinatorArgs {
    pub store: Arc<CkptStore>,
    pub events: mpsc::Sender<CkptEvent>,
    pub retention: RetentionPolicy,
    /// Set when the checkpointer shuts down (the attempt ended): a commit still waiting for votes gives up.
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
    /// The leader's own "no" votes, which may not have reached the store (a full disk).
    pub local_votes: LocalVotes,
}

pub enum CoordinatorMsg {
    Commit(CommitJob),
}

pub struct CkptCoordinator;

impl Actor for CkptCoordinator {
    type Msg = CoordinatorMsg;
    type State = CoordinatorArgs;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<CoordinatorMsg>,
        args: CoordinatorArgs,
    ) -> Result<CoordinatorArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<CoordinatorMsg>,
        msg: CoordinatorMsg,
        state: &mut CoordinatorArgs,
    ) -> Result<(), ActorProcessingErr> {
        let CoordinatorMsg::Commit(job) = msg;
        let (store, retention, cancel) = (state.store.clone(), state.retention, state.cancel.clone());
        let local_votes = state.local_votes.clone();
        let (step, stage) = (job.manifest.step, job.stage.clone());
        let t0 = Instant::now();
        let committed = tokio::task::spawn_blocking(move || commit(&store, job, retention, &cancel, &local_votes));
        let event = match committed.await {
            Ok(Ok((location, removed, bytes))) => {
                CkptEvent::Committed { step, location, secs: t0.elapsed().as_secs_f64(), removed, bytes }
            }
            Ok(Err(reason)) => CkptEvent::Abandoned { step, reason },
            Err(e) => CkptEvent::Abandoned { step, reason: format!("the coordinator task failed: {e}") },
        };
        // A "no" vote the store delivered first leaves its in-process copy behind: it is of no more use.
        state.local_votes.lock().unwrap_or_else(|p| p.into_inner()).retain(|(s, ..)| *s != stage);
        let _ = state.events.send(event);
        Ok(())
    }
}

/// How often the votes are looked for.
const POLL: Duration = Duration::from_millis(20);

/// Waits for the votes, commits, applies retention. Returns the checkpoint's location, the steps retention
/// removed and the bytes of its files; on failure, abandons the stage and says why.
fn commit(
    store: &CkptStore,
    job: CommitJob,
    policy: RetentionPolicy,
    cancel: &std::sync::atomic::AtomicBool,
    local_votes: &LocalVotes,
) -> Result<(String, Vec<u64>, u64), String> {
    let step = job.manifest.step;
    let abandon = |reason: String| {
        let _ = store.abandon(&job.stage);
        reason
    };
    let deadline = Instant::now() + job.timeout;
    let votes = loop {
        let local_no = {
            let mut local = local_votes.lock().unwrap_or_else(|p| p.into_inner());
            let mine = local.iter().position(|(stage, ..)| *stage == job.stage);
            mine.map(|i| local.swap_remove(i))
        };
        if let Some((_, rank, why)) = local_no {
            return Err(abandon(format!("rank {rank} could not write its file: {why}")));
        }
        let votes = store.read_acks(&job.stage, job.world).map_err(|e| abandon(e.to_string()))?;
        if let Some(no) = votes.iter().flatten().find(|a| a.error.is_some()) {
            let why = no.error.clone().unwrap_or_default();
            return Err(abandon(format!("rank {} could not write its file: {why}", no.rank)));
        }
        if votes.iter().all(Option::is_some) {
            break votes.into_iter().flatten().collect::<Vec<_>>();
        }
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(abandon("the attempt ended before every rank voted".into()));
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (0..job.world).filter(|&r| votes[r].is_none()).collect();
            return Err(abandon(format!(
                "rank(s) {missing:?} did not vote within {:.0} s (checkpoint.timeout_s)",
                job.timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(POLL);
    };
    let mut files: Vec<FileEntry> = votes
        .iter()
        .filter_map(|a| a.file.as_ref().map(|(name, bytes, xxh3)| (a.rank, name, *bytes, xxh3)))
        .map(|(rank, name, bytes, xxh3)| FileEntry { name: name.clone(), rank: Some(rank), bytes, xxh3: xxh3.clone() })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let manifest = Manifest { files, ..job.manifest };
    crate::chaos::failpoint("ckpt.commit.before_manifest").map_err(|e| abandon(e.to_string()))?;
    let location = store.commit(&job.stage, &manifest, job.world).map_err(|e| abandon(e.to_string()))?;
    if crate::chaos::any_armed() {
        if let Some(action) = crate::chaos::fire(&format!("ckpt.corrupt.step{step}")) {
            corrupt(store, step);
            if action == crate::chaos::Action::Kill {
                // So that the restart certainly finds the corrupt checkpoint the newest.
                crate::say!("tessera: chaos: killing this process after corrupting step {step}");
                // SAFETY: sending a signal to ourselves has no memory-safety preconditions.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        }
    }
    let removed = apply_retention(store, &policy).unwrap_or_else(|e| {
        crate::say!("tessera: retention after {}: {e}", checkpoint_name(step));
        vec![]
    });
    let bytes = manifest.files.iter().map(|f| f.bytes).sum();
    Ok((location, removed, bytes))
}

/// Fault injection: truncates rank 0's file of a committed checkpoint (on a local store) to half its size,
/// as a bad disk or an interrupted copy would.
fn corrupt(store: &CkptStore, step: u64) {
    let Some(root) = store.local_root() else {
        crate::say!("tessera: chaos: ckpt.corrupt only works on a local checkpoint store");
        return;
    };
    let path = root.join(checkpoint_name(step)).join(crate::ckpt::store::rank_file(0));
    let truncated = std::fs::metadata(&path)
        .and_then(|m| std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(m.len() / 2)));
    match truncated {
        Ok(()) => crate::say!("tessera: chaos: truncated {}", path.display()),
        Err(e) => crate::say!("tessera: chaos: cannot truncate {}: {e}", path.display()),
    }
}

/// Deletes what the retention policy says to, returning the steps removed.
fn apply_retention(store: &CkptStore, policy: &RetentionPolicy) -> Result<Vec<u64>, crate::ckpt::store::CkptError> {
    let listed = store.list()?;
    let mut infos = vec![];
    for l in listed.iter().filter(|l| l.committed) {
        // Cleanliness is the spike detector's verdict in the manifest; unreadable counts as not clean.
        let clean = store.manifest(&l.name).map(|m| m.is_clean()).unwrap_or(false);
        infos.push(CheckpointInfo { step: l.step, clean, committed: true });
    }
    let mut removed = vec![];
    for action in retention::plan(policy, &infos) {
        if let RetentionAction::Delete { step } = action {
            store.remove(step)?;
            removed.push(step);
        }
    }
    Ok(removed)
}
