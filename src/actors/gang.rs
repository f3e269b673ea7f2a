//! The gang actor: the launcher's supervisor of one run's rank processes.
//!
//! It takes over the rank processes that survived the previous gang (reset in place) and starts a
//! [`RankProcess`] actor for every other local rank, serves the rendezvous, then listens to every rank's
//! control channel. The run succeeds when every rank has reported `Done` and exited cleanly. Any rank that
//! fails, exits early or cannot start fails the run. When the supervisor can restart (`next_port`) and the
//! failure names its culprits, only those are killed: every other rank is told `Reset` (its in-flight
//! collectives fail fast, and its process joins the next gang's rendezvous, keeping libtorch and its CUDA
//! context); the gang hands the survivors' processes back with its report. Otherwise every rank is told
//! `Abort` and what still runs after a grace period is killed.
//!
//! With several nodes, node 0's gang holds every rank's control channel, but starts and watches only node
//! 0's processes: the other nodes' exits arrive through their node agents (via the supervisor) as
//! [`GangMsg::Exited`], and their culprits are killed by their node agents when the next gang forms.

use super::policy::{self, RankView};
use super::rank_process::{NodeRanks, Owner, RankProcessMsg};
use crate::launch::protocol::{self, LauncherMsg, WorkerMsg};
use crate::launch::rendezvous::{self, Member};
use crate::launch::LaunchError;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::time::{Duration, Instant};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;

/// What the launcher asks of the gang.
pub struct GangArgs {
    /// This node's ranks and how to start them.
    pub ranks: NodeRanks,
    /// The rendezvous listener (node 0 only; `None` on other nodes).
    pub rdzv: Option<tokio::net::TcpListener>,
    pub rdzv_addr: std::net::SocketAddr,
    pub rdzv_timeout: Duration,
    /// Heartbeat and progress silence that counts as a hang; `None` derives it from observed step times.
    pub hang_timeout: Option<Duration>,
    /// Told every step rank 0 reports completed, and the moment a fault is detected (the supervisor
    /// measures detection and recovery with them).
    pub progress: Option<tokio::sync::mpsc::UnboundedSender<GangNews>>,
    /// Where to record what the ranks report (the launcher's Prometheus metrics).
    pub metrics: Option<super::metrics_exporter::Metrics>,
    /// How the ranks start (sent with the peer list).
    pub start: crate::launch::protocol::StartSpec,
    /// Processes of the previous gang that were reset in place, by local rank.
    pub live: Vec<Option<ActorRef<RankProcessMsg>>>,
    /// Where survivors of a failure go: the port of the next gang's rendezvous, on the rendezvous host;
    /// `None`: no reset in place.
    pub next_port: Option<u16>,
    /// Told the run's outcome once, when the gang stops.
    pub outcome: oneshot::Sender<GangEnd>,
}

/// How a gang ended, and the processes it hands over (survivors reset in place, by local rank).
pub struct GangEnd {
    pub result: Result<GangReport, LaunchError>,
    pub live: Vec<Option<ActorRef<RankProcessMsg>>>,
    /// Other nodes' ranks that did not acknowledge their reset in time, or could not be told (to be replaced
    /// there).
    pub unreached: Vec<usize>,
}

/// A finished run, as the gang saw it.
#[derive(Debug, Clone)]
pub struct GangReport {
    pub steps: u64,
    pub final_loss: f64,
    /// The run stopped early on a preemption request, after committing a checkpoint of `steps`.
    pub preempted: bool,
}

pub enum GangMsg {
    /// The rendezvous finished (node 0).
    Formed(Result<Vec<Member>, LaunchError>),
    /// A message on rank `rank`'s control channel.
    FromRank(usize, WorkerMsg),
    /// Rank `rank`'s control channel closed.
    ChannelClosed(usize),
    /// Rank `rank`'s process ended (on another node: as its node agent reports).
    Exited { rank: usize, success: bool, how: String },
    /// The supervisor stops the gang with this failure (another node's launcher went away).
    Fail(LaunchError),
    /// The grace period after an abort is over: kill what still runs.
    KillStragglers,
    /// Time to look for a hang.
    CheckHang,
    /// Preemption (SIGTERM/SIGINT): every rank checkpoints a common step soon and exits cleanly.
    Preempt,
    /// A rank reported an error a moment ago; unless a process has died meanwhile (the likelier culprit, whose
    /// death the error is usually a symptom of), it stands as the gang's failure.
    Blame { rank: usize, reason: String, recovery: crate::error::Recovery },
}

/// How long a rank's reported error waits for a process death to blame instead: a peer's death reaches the
/// survivors' collectives (as "connection lost") about as fast as its exit reaches the launcher.
const BLAME_DELAY: Duration = Duration::from_millis(500);

/// How long ranks get to checkpoint and exit after a preemption request.
pub const PREEMPT_GRACE: Duration = Duration::from_secs(120);

pub struct Gang;

pub struct GangState {
    ranks: NodeRanks,
    writers: Vec<Option<OwnedWriteHalf>>,
    /// Each local rank's process actor (`None` once it exited).
    children: Vec<Option<ActorRef<RankProcessMsg>>>,
    /// Ranks told to reset in place, and ranks whose control channel closed (their acknowledgement), by
    /// global rank.
    resetting: Vec<bool>,
    closed: Vec<bool>,
    next_port: Option<u16>,
    done: Vec<Option<(u64, f64)>>,
    /// Ranks whose process ended (another node's: as its node agent said).
    exited: Vec<bool>,
    /// Other nodes' ranks that did not acknowledge their reset within the grace period, or could not be told
    /// (the gang failed before its rendezvous formed): their node agents replace them when the next gang
    /// forms.
    unreached: Vec<usize>,
    failure: Option<LaunchError>,
    outcome: Option<oneshot::Sender<GangEnd>>,
    /// What each rank's heartbeats said (`None` until its first).
    views: Vec<Option<RankView>>,
    /// Every rank was asked to checkpoint and stop (preemption).
    preempted: bool,
    /// Ranks that reported an error of their own (blamed after [`BLAME_DELAY`] unless someone died).
    reported: Vec<bool>,
    hang_timeout: Option<Duration>,
    /// The slowest step seen (rank 0's step intervals), for the derived hang timeout.
    slowest_step: Option<Duration>,
    progress: Option<tokio::sync::mpsc::UnboundedSender<GangNews>>,
    metrics: Option<super::metrics_exporter::Metrics>,
    /// Each rank's host and device, from its join (for reports naming a faulty rank).
    placement: Vec<(String, String)>,
}

/// What the gang tells its supervisor while it runs.
#[derive(Debug, Clone)]
pub enum GangNews {
    /// Rank 0 completed this step.
    Step(u64),
    /// The gang's ranks start at this step (rank 0's word: the checkpoint they resumed from, or 0).
    Resumed(u64),
    /// A fault was detected now (the gang is stopping because of it).
    Fault(String),
}

impl GangState {
    fn local(&self, rank: usize) -> Option<usize> {
        self.ranks.local(rank)
    }
}

impl Actor for Gang {
    type Msg = GangMsg;
    type State = GangState;
    type Arguments = GangArgs;

    async fn pre_start(&self, myself: ActorRef<GangMsg>, a: GangArgs) -> Result<GangState, ActorProcessingErr> {
        let mut children = vec![];
        let mut live = a.live;
        live.resize_with(a.ranks.nproc, || None);
        for (local, survivor) in live.into_iter().enumerate() {
            if let Some(p) = survivor {
                // Reset in place: its process joins this gang's rendezvous by itself.
                let _ = p.cast(RankProcessMsg::SetGang(myself.clone()));
                children.push(Some(p));
                continue;
            }
            children.push(Some(a.ranks.start(local, a.rdzv_addr, Owner::Gang(myself.clone())).await?));
        }
        let world = a.ranks.world;
        if let Some(listener) = a.rdzv {
            let (secret, timeout, me) = (a.ranks.secret.clone(), a.rdzv_timeout, myself.clone());
            let start = a.start.clone();
            tokio::spawn(async move {
                let formed = rendezvous::serve(&listener, secret.as_bytes(), world, timeout, &start, |peer, why| {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "tessera launch: refused a connection from {peer}: {why}");
                })
                .await;
                let _ = me.cast(GangMsg::Formed(formed));
            });
        }
        Ok(GangState {
            ranks: a.ranks,
            writers: (0..world).map(|_| None).collect(),
            children,
            resetting: vec![false; world],
            closed: vec![false; world],
            next_port: a.next_port,
            done: vec![None; world],
            exited: vec![false; world],
            unreached: vec![],
            failure: None,
            outcome: Some(a.outcome),
            views: vec![None; world],
            reported: vec![false; world],
            preempted: false,
            hang_timeout: a.hang_timeout,
            slowest_step: None,
            progress: a.progress,
            metrics: a.metrics,
            placement: vec![(String::new(), String::new()); world],
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<GangMsg>,
        msg: GangMsg,
        s: &mut GangState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GangMsg::Formed(Ok(members)) => {
                myself.send_interval(Duration::from_millis(250), || GangMsg::CheckHang);
                // Every member is watched from now on: one that never beats is as silent as one that stopped.
                let now = Instant::now();
                for m in &members {
                    let rank = m.join.rank;
                    s.placement[rank] = (m.join.host.clone(), m.join.device.clone());
                    s.views[rank] = Some(RankView {
                        rank,
                        heartbeat: now,
                        step: 0,
                        seq: 0,
                        progressed: now,
                        done: false,
                        io: true,
                    });
                }
                for m in members {
                    let rank = m.join.rank;
                    let (mut read, mut write) = m.stream.into_split();
                    if s.preempted {
                        // Asked to stop before this rank joined (a preemption during a restart): it is told now.
                        let _ = protocol::send_async(&mut write, &LauncherMsg::Preempt).await;
                    }
                    s.writers[rank] = Some(write);
                    let me = myself.clone();
                    tokio::spawn(async move {
                        loop {
                            match protocol::recv_async::<WorkerMsg, _>(&mut read).await {
                                Ok(msg) => {
                                    let _ = me.cast(GangMsg::FromRank(rank, msg));
                                }
                                Err(_) => {
                                    let _ = me.cast(GangMsg::ChannelClosed(rank));
                                    return;
                                }
                            }
                        }
                    });
                }
            }
            GangMsg::Formed(Err(e)) => self.fail(&myself, s, e).await,
            GangMsg::FromRank(rank, WorkerMsg::Done { steps, final_loss }) => {
                if let (0, Some(p)) = (rank, &s.progress) {
                    let _ = p.send(GangNews::Step(steps));
                }
                s.done[rank] = Some((steps, final_loss));
                if let Some(v) = s.views[rank].as_mut() {
                    v.done = true;
                }
            }
            GangMsg::FromRank(rank, WorkerMsg::Heartbeat { step, seq, phase }) => {
                let now = Instant::now();
                use crate::train::Phase;
                let done = s.done[rank].is_some() || phase == Phase::Done as u8;
                // Starting (loading a checkpoint, opening the corpus), waiting for data (a shard fetched from
                // object storage) and checkpointing: storage that may be slow, not a stuck collective.
                let io = [Phase::Starting, Phase::Data, Phase::Checkpoint].iter().any(|&p| phase == p as u8);
                let view = s.views[rank].get_or_insert(RankView {
                    rank,
                    heartbeat: now,
                    step,
                    seq,
                    progressed: now,
                    done,
                    io,
                });
                if (view.step, view.seq) != (step, seq) {
                    if rank == 0 && step > view.step && view.step > 0 {
                        let took = now - view.progressed;
                        s.slowest_step = Some(s.slowest_step.map_or(took, |d| d.max(took)));
                        if let Some(m) = &s.metrics {
                            // Heartbeats are 200 ms apart: the time per step over the steps since the last one.
                            m.step_seconds.observe(took.as_secs_f64() / (step - view.step) as f64);
                        }
                    }
                    if rank == 0 && step > view.step {
                        if let Some(p) = &s.progress {
                            let _ = p.send(GangNews::Step(step));
                        }
                    }
                    (view.step, view.seq, view.progressed) = (step, seq, now);
                }
                view.heartbeat = now;
                view.done |= done;
                view.io = io;
            }
            GangMsg::Preempt => {
                s.preempted = true;
                for w in s.writers.iter_mut().flatten() {
                    let _ = protocol::send_async(w, &LauncherMsg::Preempt).await;
                }
                // Bounded: ranks that have not exited in time are killed (the checkpoint may then be lost, and
                // the previous one stays the newest).
                myself.send_after(PREEMPT_GRACE, || GangMsg::KillStragglers);
            }
            GangMsg::CheckHang => {
                if let Some(m) = &s.metrics {
                    for v in s.views.iter().flatten() {
                        let age = v.heartbeat.elapsed().as_secs_f64();
                        m.heartbeat_age_seconds
                            .get_or_create(&super::metrics_exporter::RankLabel { rank: v.rank.to_string() })
                            .set(age);
                    }
                }
                if s.failure.is_none() {
                    let timeout = s.hang_timeout.unwrap_or_else(|| derived_hang_timeout(s.slowest_step));
                    let views: Vec<RankView> = s.views.iter().flatten().copied().collect();
                    if let Some(h) = policy::hang(&views, timeout, Instant::now()) {
                        self.fail(&myself, s, LaunchError::Hung { ranks: h.ranks, reason: h.reason }).await;
                    }
                }
            }
            GangMsg::FromRank(_, WorkerMsg::Anomaly(mut anomaly)) => {
                // Rank 0's detector stopped training: no culprit to wait for. A faulty rank is named with its
                // host and device, and its process goes at once (it is replaced with the others).
                if let crate::spike::Anomaly::RankFault { fault, host, device } = &mut anomaly {
                    if let Some((h, d)) = s.placement.get(fault.rank) {
                        (*host, *device) = (h.clone(), d.clone());
                    }
                }
                self.fail(&myself, s, LaunchError::Anomaly(Box::new(anomaly))).await;
            }
            GangMsg::FromRank(rank, WorkerMsg::Failed { error, recovery }) => {
                s.reported[rank] = true;
                myself.send_after(BLAME_DELAY, move || GangMsg::Blame { rank, reason: error, recovery });
            }
            GangMsg::Blame { rank, reason, recovery } => {
                let e = match recovery {
                    crate::error::Recovery::Never => LaunchError::Unrecoverable { rank, reason },
                    crate::error::Recovery::WaitForStorage => LaunchError::StorageUnavailable { rank, reason },
                    crate::error::Recovery::Restart => LaunchError::RankFailed { rank, reason },
                };
                self.fail(&myself, s, e).await;
                if self.settled(s) {
                    self.finish(&myself, s);
                }
            }
            GangMsg::FromRank(rank, msg @ WorkerMsg::Progress { step, .. }) => {
                // A logged step is news sooner than the next heartbeat.
                if let (0, Some(p)) = (rank, &s.progress) {
                    let _ = p.send(GangNews::Step(step));
                }
                if let Some(m) = &s.metrics {
                    m.record(&msg);
                }
            }
            GangMsg::FromRank(_, msg @ WorkerMsg::Checkpoint { .. }) => {
                if let Some(m) = &s.metrics {
                    m.record(&msg);
                }
            }
            GangMsg::FromRank(0, WorkerMsg::Resumed { step }) => {
                if let Some(p) = &s.progress {
                    let _ = p.send(GangNews::Resumed(step));
                }
            }
            GangMsg::FromRank(_, WorkerMsg::Join(_) | WorkerMsg::Enlist(_) | WorkerMsg::Resumed { .. }) => {}
            GangMsg::Fail(e) => self.fail(&myself, s, e).await,
            GangMsg::ChannelClosed(rank) => {
                s.closed[rank] = true;
                if s.failure.is_some() && self.settled(s) {
                    self.finish(&myself, s);
                }
            }
            GangMsg::Exited { rank, .. } if rank >= s.exited.len() => {
                // Another node's agent reported a rank this gang does not have: its word is not to be trusted.
                crate::say!(
                    "tessera launch: ignoring a node's report that rank {rank} exited (the gang has ranks 0-{})",
                    s.exited.len() - 1
                );
            }
            GangMsg::Exited { rank, success, how } => {
                s.exited[rank] = true;
                if let Some(local) = s.local(rank) {
                    s.children[local] = None;
                }
                // A rank that reported its error is blamed (or not) when its report's delay is over.
                if !(success && s.done[rank].is_some()) && s.failure.is_none() && !s.reported[rank] {
                    let reason = if success { format!("{how} before finishing") } else { how };
                    self.fail(&myself, s, LaunchError::RankFailed { rank, reason }).await;
                }
                let blame_pending = s.failure.is_none() && s.reported.iter().any(|&r| r);
                if self.settled(s) && !blame_pending {
                    self.finish(&myself, s);
                }
            }
            GangMsg::KillStragglers => {
                // Survivors that did not acknowledge their reset in time are killed too, and replaced: here at
                // once, on other nodes by their node agents when the next gang forms.
                for rank in 0..s.resetting.len() {
                    let acked = s.resetting[rank] && s.closed[rank];
                    match s.local(rank) {
                        Some(local) if !acked => {
                            s.resetting[rank] = false;
                            if let Some(c) = &s.children[local] {
                                c.stop(Some("grace period over".into()));
                            }
                        }
                        None if s.resetting[rank] && !acked && !s.exited[rank] => {
                            s.resetting[rank] = false;
                            s.unreached.push(rank);
                        }
                        _ => {}
                    }
                }
                if s.failure.is_some() && self.settled(s) {
                    self.finish(&myself, s);
                }
            }
        }
        Ok(())
    }
}

/// The hang timeout when none is configured: 300 s until steps have been timed (start-up, first steps with
/// their one-off costs), then 10 × the slowest step seen, at least 60 s. The same idea as NVIDIA's resiliency
/// extension, which derives its timeouts from observed iteration times rather than a fixed guess.
pub fn derived_hang_timeout(slowest_step: Option<Duration>) -> Duration {
    match slowest_step {
        None => Duration::from_secs(300),
        Some(d) => (d * 10).max(Duration::from_secs(60)),
    }
}

impl Gang {
    /// Records the first failure and stops the gang: abort every rank, kill stragglers after a grace period.
    async fn fail(&self, myself: &ActorRef<GangMsg>, s: &mut GangState, e: LaunchError) {
        if s.failure.is_some() {
            return;
        }
        let reason = e.to_string();
        if let Some(p) = &s.progress {
            let _ = p.send(GangNews::Fault(reason.clone()));
        }
        // A hung rank cannot act on an abort (it may be stopped, or stuck in a device call): kill it now rather
        // than after the grace period the others get to exit cleanly.
        if let Some(m) = &s.metrics {
            // A process exit is seen at once; a hang once its silence outlasted the timeout.
            let detect = match &e {
                LaunchError::Hung { ranks, .. } => ranks
                    .iter()
                    .filter_map(|&r| s.views.get(r).copied().flatten())
                    .map(|v| v.heartbeat.elapsed().min(v.progressed.elapsed()).as_secs_f64())
                    .fold(0.0, f64::max),
                _ => 0.0,
            };
            m.detect_seconds.observe(detect);
        }
        // Culprits are killed at once (a hung rank cannot act on an abort; a faulty one must not go on); with
        // a next gang to join, everyone else is reset in place, otherwise aborted.
        let culprits = culprits(&e);
        let reset = s.next_port.filter(|_| culprits.is_some() && !s.preempted);
        let culprits = culprits.unwrap_or_default();
        for &r in &culprits {
            if let Some(c) = s.local(r).and_then(|l| s.children[l].as_ref()) {
                c.stop(Some("culprit".into()));
            }
        }
        s.failure = Some(e);
        for (rank, w) in s.writers.iter_mut().enumerate() {
            let Some(w) = w else { continue };
            let msg = match reset {
                Some(port) if !culprits.contains(&rank) => {
                    s.resetting[rank] = true;
                    LauncherMsg::Reset { port }
                }
                _ => LauncherMsg::Abort { reason: reason.clone() },
            };
            let _ = protocol::send_async(w, &msg).await;
        }
        myself.send_after(Duration::from_secs(5), || GangMsg::KillStragglers);
        // Without a control channel yet (rendezvous failed), nobody can be told: stop the processes now, and
        // have the other nodes replace theirs (some may be waiting in this gang's rendezvous).
        if s.writers.iter().all(Option::is_none) {
            for c in s.children.iter().flatten() {
                c.stop(Some("run failed".into()));
            }
            s.resetting.iter_mut().for_each(|r| *r = false);
            let remote: Vec<usize> = (0..s.resetting.len()).filter(|&r| s.local(r).is_none()).collect();
            s.unreached = remote;
        }
        if self.settled(s) {
            self.finish(myself, s);
        }
    }

    /// Every local process has either exited or, told to reset, closed its control channel; and every other
    /// node's rank told to reset has closed it too, or ended (its node agent replaces what is gone).
    fn settled(&self, s: &GangState) -> bool {
        (0..s.resetting.len()).all(|r| match s.local(r) {
            Some(_) => s.exited[r] || (s.resetting[r] && s.closed[r]),
            None => !s.resetting[r] || s.closed[r] || s.exited[r],
        })
    }

    fn finish(&self, myself: &ActorRef<GangMsg>, s: &mut GangState) {
        let result = match s.failure.take() {
            Some(e) => Err(e),
            None => {
                let (steps, final_loss) = s.done.iter().flatten().next().copied().unwrap_or((0, f64::NAN));
                Ok(GangReport { steps, final_loss, preempted: s.preempted })
            }
        };
        // Hand over the processes that were reset in place and acknowledged it.
        let live = (0..s.ranks.nproc)
            .map(|l| {
                let r = s.ranks.first_rank + l;
                let acked = s.resetting[r] && s.closed[r] && !s.exited[r];
                if acked {
                    s.children[l].take()
                } else {
                    None
                }
            })
            .collect();
        if let Some(tx) = s.outcome.take() {
            let _ = tx.send(GangEnd { result, live, unreached: std::mem::take(&mut s.unreached) });
        }
        myself.stop(None);
    }
}

/// The ranks a failure blames, to be killed and replaced while the others reset in place; `None` for
/// failures a restart cannot fix (they stop everyone).
pub fn culprits(e: &LaunchError) -> Option<Vec<usize>> {
    match e {
        LaunchError::RankFailed { rank, .. }
        | LaunchError::Unrecoverable { rank, .. }
        | LaunchError::StorageUnavailable { rank, .. }
        | LaunchError::Spawn { rank, .. } => Some(vec![*rank]),
        LaunchError::Hung { ranks, .. } | LaunchError::NeverJoined { ranks, .. } => Some(ranks.clone()),
        LaunchError::Anomaly(a) => match a.as_ref() {
            crate::spike::Anomaly::Spike(_) => Some(vec![]),
            crate::spike::Anomaly::RankFault { fault, .. } => Some(vec![fault.rank]),
        },
        _ => None,
    }
}
