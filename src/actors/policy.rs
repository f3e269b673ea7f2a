//! The supervisors' decisions as pure functions: whether to restart after a fault (restart intensity, as in
//! Erlang/OTP), whether a gang is hung and who hangs it, what a node agent does with its ranks when a gang
//! forms, and how long a node may stay silent. The actors feed them observations and carry out what they
//! return; tests call them with made-up times.

use std::time::{Duration, Instant};

/// At most `max_restarts` restarts within any `window`; one more escalates (Erlang/OTP's intensity and
/// period).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    pub max_restarts: usize,
    pub window: Duration,
}

/// What to do about a fault.
#[derive(Debug, Clone, PartialEq)]
pub enum RestartDecision {
    /// Restart the gang (this is restart number `n` within the window).
    Restart { n: usize },
    /// Stop the run: `restarts` restarts already happened within the window.
    GiveUp { restarts: usize },
}

/// Decides on a fault at `now`, given the times of earlier restarts.
pub fn on_fault(policy: &RestartPolicy, restarts: &[Instant], now: Instant) -> RestartDecision {
    let recent = restarts.iter().filter(|&&t| now.saturating_duration_since(t) <= policy.window).count();
    if recent >= policy.max_restarts {
        RestartDecision::GiveUp { restarts: recent }
    } else {
        RestartDecision::Restart { n: recent + 1 }
    }
}

/// What a node agent does with one of its local ranks when a gang forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAction {
    /// Its process survived and was told to reset in place: it joins by itself.
    Adopt,
    /// Its process is a culprit of the last failure: kill it and start a new one.
    Replace,
    /// It has no process (it ended): start one.
    Start,
}

/// The node agent's plan for a forming gang: for each local rank (`alive[l]`: its process still runs, rank
/// `first_rank + l`), given the last failure's culprits (global ranks, of any node).
pub fn node_plan(first_rank: usize, alive: &[bool], culprits: &[usize]) -> Vec<NodeAction> {
    alive
        .iter()
        .enumerate()
        .map(|(l, &alive)| match (alive, culprits.contains(&(first_rank + l))) {
            (true, false) => NodeAction::Adopt,
            (true, true) => NodeAction::Replace,
            (false, _) => NodeAction::Start,
        })
        .collect()
}

/// How long a node's launcher may stay silent before it counts as lost (seen from node 0, or node 0's seen
/// from another node): the configured hang timeout, but at least three heartbeats; 60 s when the hang
/// timeout is derived (the derived one's floor).
pub fn node_silence(hang_timeout: Option<Duration>) -> Duration {
    match hang_timeout {
        Some(t) => t.max(3 * crate::launch::protocol::NODE_HEARTBEAT),
        None => Duration::from_secs(60),
    }
}

/// What the gang last heard from one rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankView {
    pub rank: usize,
    /// When its last heartbeat arrived.
    pub heartbeat: Instant,
    /// Steps completed and collectives entered, as of that heartbeat.
    pub step: u64,
    pub seq: u64,
    /// When `(step, seq)` last changed.
    pub progressed: Instant,
    /// It reported that it finished (finished ranks are quiet, not hung).
    pub done: bool,
    /// Its last heartbeat said it reads or writes storage (starting: loading a checkpoint or the corpus;
    /// waiting for data; checkpointing): slow storage, not a stuck collective.
    pub io: bool,
}

/// How long a gang may go without progress while a rank reads or writes storage: ten hang timeouts, at
/// least 10 minutes (a large checkpoint from a slow store; the storage client gives up on a store that does
/// not answer well within it).
pub fn io_limit(timeout: Duration) -> Duration {
    (timeout * 10).max(Duration::from_secs(600))
}

/// A hang, and who is to blame.
#[derive(Debug, Clone, PartialEq)]
pub struct Hang {
    pub ranks: Vec<usize>,
    pub reason: String,
}

/// Whether the gang is hung at `now`. A rank whose heartbeat is older than `timeout` is hung (a stopped
/// process, a dead host). Otherwise, if no rank has progressed for `timeout` (for [`io_limit`] while a rank
/// reads or writes storage), the ranks that entered the fewest collectives are to blame: they never entered
/// the collective the others wait in.
pub fn hang(ranks: &[RankView], timeout: Duration, now: Instant) -> Option<Hang> {
    let live: Vec<&RankView> = ranks.iter().filter(|r| !r.done).collect();
    let silent: Vec<usize> =
        live.iter().filter(|r| now.saturating_duration_since(r.heartbeat) > timeout).map(|r| r.rank).collect();
    if !silent.is_empty() {
        return Some(Hang {
            reason: format!("no heartbeat for more than {:.1} s (stopped, or its host is gone)", timeout.as_secs_f64()),
            ranks: silent,
        });
    }
    let limit = if live.iter().any(|r| r.io) { io_limit(timeout) } else { timeout };
    if live.is_empty() || live.iter().any(|r| now.saturating_duration_since(r.progressed) <= limit) {
        return None;
    }
    let timeout = limit;
    let max_seq = live.iter().map(|r| r.seq).max().unwrap_or(0);
    let min_seq = live.iter().map(|r| r.seq).min().unwrap_or(0);
    if min_seq < max_seq {
        let ranks = live.iter().filter(|r| r.seq == min_seq).map(|r| r.rank).collect();
        let reason = format!(
            "never entered collective #{max_seq} that the others wait in (stuck after #{min_seq}) for {:.1} s",
            timeout.as_secs_f64()
        );
        return Some(Hang { ranks, reason });
    }
    Some(Hang {
        ranks: live.iter().map(|r| r.rank).collect(),
        reason: format!(
            "no rank progressed for {:.1} s, all inside collective #{max_seq} (a stuck transport or device)",
            timeout.as_secs_f64()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(rank: usize, t0: Instant, hb: u64, step: u64, seq: u64, progressed: u64) -> RankView {
        RankView {
            rank,
            heartbeat: t0 + Duration::from_secs(hb),
            step,
            seq,
            progressed: t0 + Duration::from_secs(progressed),
            done: false,
            io: false,
        }
    }

    #[test]
    fn restarts_are_allowed_up_to_the_intensity_then_the_run_gives_up() {
        let p = RestartPolicy { max_restarts: 2, window: Duration::from_secs(60) };
        let t0 = Instant::now();
        assert_eq!(on_fault(&p, &[], t0), RestartDecision::Restart { n: 1 });
        assert_eq!(on_fault(&p, &[t0], t0 + Duration::from_secs(1)), RestartDecision::Restart { n: 2 });
        let two = [t0, t0 + Duration::from_secs(1)];
        assert_eq!(on_fault(&p, &two, t0 + Duration::from_secs(2)), RestartDecision::GiveUp { restarts: 2 });
        // Restarts older than the window no longer count.
        assert_eq!(on_fault(&p, &two, t0 + Duration::from_secs(120)), RestartDecision::Restart { n: 1 });
    }

    #[test]
    fn a_silent_rank_is_named_before_anything_else() {
        let t0 = Instant::now();
        let ranks = [view(0, t0, 10, 5, 40, 10), view(1, t0, 2, 5, 40, 2), view(2, t0, 10, 5, 40, 10)];
        let h = hang(&ranks, Duration::from_secs(3), t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(h.ranks, [1]);
        assert!(h.reason.contains("no heartbeat"));
    }

    #[test]
    fn when_nobody_progresses_the_rank_that_never_entered_the_collective_is_blamed() {
        let t0 = Instant::now();
        let ranks = [view(0, t0, 10, 5, 41, 2), view(1, t0, 10, 5, 40, 2), view(2, t0, 10, 5, 41, 2)];
        let h = hang(&ranks, Duration::from_secs(3), t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(h.ranks, [1]);
        assert!(h.reason.contains("collective #41"), "{}", h.reason);
        // Progress within the timeout is no hang; finished ranks are never hung.
        assert_eq!(hang(&ranks, Duration::from_secs(30), t0 + Duration::from_secs(10)), None);
        let done: Vec<RankView> = ranks.iter().map(|r| RankView { done: true, ..*r }).collect();
        assert_eq!(hang(&done, Duration::from_secs(3), t0 + Duration::from_secs(100)), None);
    }

    #[test]
    fn a_rank_busy_with_storage_gets_the_io_limit_before_the_gang_counts_as_hung() {
        let t0 = Instant::now();
        let loading = RankView { io: true, ..view(1, t0, 10, 0, 3, 2) };
        let ranks = [view(0, t0, 10, 0, 4, 2), loading];
        let timeout = Duration::from_secs(3);
        assert_eq!(hang(&ranks, timeout, t0 + Duration::from_secs(10)), None, "slow storage is not a hang");
        // Still beating, still not progressing, past the limit.
        let late = t0 + Duration::from_secs(3) + io_limit(timeout);
        let beating = ranks.map(|r| RankView { heartbeat: late, ..r });
        assert_eq!(hang(&beating, timeout, late).unwrap().ranks, [1], "but not forever");
        // Its heartbeat still counts at the plain timeout: a stopped process is not busy with storage.
        let silent = [view(0, t0, 10, 0, 4, 2), RankView { io: true, ..view(1, t0, 2, 0, 3, 2) }];
        assert_eq!(hang(&silent, timeout, t0 + Duration::from_secs(10)).unwrap().ranks, [1]);
    }

    #[test]
    fn a_node_counts_as_lost_after_the_hang_timeout_but_never_before_three_heartbeats() {
        let beat = crate::launch::protocol::NODE_HEARTBEAT;
        assert_eq!(node_silence(Some(Duration::from_secs(20))), Duration::from_secs(20));
        assert_eq!(node_silence(Some(Duration::from_millis(100))), 3 * beat);
        assert_eq!(node_silence(None), Duration::from_secs(60));
    }

    #[test]
    fn a_node_replaces_its_culprits_starts_its_ended_ranks_and_adopts_the_rest() {
        use NodeAction::*;
        // Node 1 of a world of 8: ranks 4..8. Rank 5 is a culprit, rank 6 has ended, rank 2 is another node's.
        let plan = node_plan(4, &[true, true, false, true], &[2, 5]);
        assert_eq!(plan, [Adopt, Replace, Start, Adopt]);
        assert_eq!(node_plan(4, &[false, false], &[]), [Start, Start], "the first gang starts every rank");
    }
}
