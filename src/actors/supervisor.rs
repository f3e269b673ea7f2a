//! The root supervisor of a launch: it runs the gang, and when the gang fails recoverably (a rank crashed,
//! was killed, or hung) it rolls the whole gang back: the failed ranks' processes are replaced, the healthy
//! ranks are reset in place (same process, libtorch and CUDA context; they join the next gang's rendezvous,
//! which the supervisor binds in advance), and the next gang resumes from the newest committed checkpoint, in
//! the same data order (crashes and hangs do not reshuffle). The supervisor owns the surviving processes
//! between gangs and kills them if the launch ends instead.
//!
//! Restart intensity works as in Erlang/OTP ([`policy::on_fault`]): more than `launch.max_restarts` restarts
//! within `launch.restart_window_s` escalates, and the launch stops with [`LaunchError::GaveUp`] (exit code 3)
//! naming the last failure. Failures that a restart cannot fix (a worker that cannot be started at all, a
//! rendezvous rejected for a config mismatch) stop the launch at once.
//!
//! Every fault, restart, recovery and give-up goes to the event log ([`EventLog`]) with the times that
//! matter: how long recovery took from the fault's detection to the first step completed after it, and how
//! many steps were lost (done before the fault, after the checkpoint resumed from).
//!
//! **Spikes.** When rank 0's spike detector stops the gang ([`LaunchError::Anomaly`]), the supervisor plans
//! the rollback ([`crate::spike::respond`]): the newest clean checkpoint before the spike, a fresh data order
//! for the rest of the epoch (not for a faulty rank), escalation on repeats. It removes the checkpoints of the
//! abandoned history, records the plan in the spike ledger (`spike` events), and starts a fresh gang that
//! carries the rollback out. Spike rollbacks have their own limit (`spike.max_repeats`, exit code 4) and do
//! not count towards the crash-restart intensity.
//!
//! **Storage outages.** A rank that cannot reach the storage holding the corpus or the checkpoints (no answer,
//! or an overloaded or failing server: [`crate::error::Recovery::WaitForStorage`]) is not a crash: the
//! supervisor waits for the storage to answer, probing it with backoff, and then restarts the gang from the
//! newest committed checkpoint without counting a restart. So does a restart that finds the checkpoint store
//! unreachable. Survivors are let go once the first probe fails (a long wait would outlast their
//! rendezvous). The wait is bounded by `launch.storage_wait_s` ([`LaunchError::StorageGaveUp`], exit code 3);
//! its clock runs until a step completes after the storage came back, so a store that answers probes but
//! fails the ranks again cannot restart the gang forever. `storage_wait` and `storage_back` go to the event
//! log.
//!
//! **Several nodes.** The supervisor of node 0 is the root of the whole run: every rank joins its gangs'
//! rendezvous, and the launchers of the other nodes are its node agents ([`super::node_agent`]), enlisted
//! before the first gang. It tells them where each gang forms and which of their ranks to replace, hears
//! from them how their processes end, and tells them how the launch ended. Survivors on every node reset in
//! place. Each gang's rendezvous listens on the host of the first (`--rdzv`), on a fresh port.

use super::gang::{Gang, GangArgs, GangNews, GangReport};
use super::policy::{self, RestartDecision, RestartPolicy};
use super::rank_process::{NodeRanks, RankProcessMsg};
use crate::ckpt::store::CkptStore;
use crate::launch::events::EventLog;
use crate::launch::protocol::{self, Failed, Finished, NodeMsg, RootMsg};
use crate::launch::LaunchError;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Everything needed to start a gang, again and again.
pub struct SupervisorArgs {
    /// Node 0's ranks (the supervisor runs on node 0) and how to start them.
    pub ranks: NodeRanks,
    /// The first gang's rendezvous listener and address (later gangs bind a fresh port on its host).
    pub rdzv: Option<tokio::net::TcpListener>,
    pub rdzv_addr: SocketAddr,
    pub rdzv_timeout: Duration,
    pub hang_timeout: Option<Duration>,
    pub policy: RestartPolicy,
    /// The other nodes' launchers (empty on a single node), enlisted at the first rendezvous.
    pub nodes: Vec<crate::launch::rendezvous::Agent>,
    pub events: EventLog,
    /// The run's checkpoints, to know what a restart resumes from.
    pub store: Option<Arc<CkptStore>>,
    pub metrics: Option<super::metrics_exporter::Metrics>,
    /// The resolved config (the spike rollback policy, batch size and seed).
    pub cfg: crate::config::RunConfig,
    pub outcome: oneshot::Sender<Result<GangReport, LaunchError>>,
}

pub enum SupervisorMsg {
    /// The current gang ended (after handing over its surviving processes).
    Ended(Result<GangReport, LaunchError>),
    /// The processes the ended gang reset in place, by local rank, and the other nodes' ranks it could not
    /// reset (their node agents replace them).
    Handover(Vec<Option<ActorRef<RankProcessMsg>>>, Vec<usize>),
    /// News from gang number `.0`.
    News(usize, GangNews),
    /// SIGTERM or SIGINT: checkpoint and stop, no restarts from now on.
    Preempt,
    /// A message from the agent of node `.0`.
    FromNode(usize, NodeMsg),
    /// Node `.0`'s launcher went away (the connection closed or failed: `.1`).
    NodeLost(usize, String),
    /// Time to ask the unreachable storage again.
    ProbeStorage,
    /// What asking it found.
    ProbeDone(Result<(), String>),
}

pub struct Supervisor;

/// Storage that does not answer: the launch waits for it before the next gang.
struct Outage {
    /// The failure that led here, and its kind (the restart's once the storage answers).
    reason: String,
    kind: &'static str,
    /// The restart already counted for it (a crash whose restart found the store unreachable), if any.
    counted: Option<usize>,
    /// The last probe's error, when the launch last said it still waits, and the next probe's delay.
    last: String,
    said: Instant,
    delay: Duration,
    /// Whether the survivors were let go.
    released: bool,
}

/// A restart waiting for its first good step.
struct Recovery {
    detected: Instant,
    resumed_at: u64,
    lost: u64,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    attempt: usize,
    restarts: Vec<Instant>,
    last_step: u64,
    recovering: Option<Recovery>,
    /// When the current gang's fault was detected.
    detected: Option<Instant>,
    /// The current gang.
    gang: Option<ActorRef<super::gang::GangMsg>>,
    preempting: bool,
    /// Waiting for unreachable storage, and since when (kept until a step completes after it answered).
    outage: Option<Outage>,
    outage_since: Option<Instant>,
    /// For goodput: when the launch started, time spent recovering, steps lost.
    started: Instant,
    down_s: f64,
    lost_total: u64,
    /// Spike rollbacks so far (from the event log when the launcher itself was restarted).
    ledger: Vec<crate::spike::rollback::Entry>,
    /// The last rollback: until a checkpoint after its target commits, a restart must carry it out again.
    directive: Option<crate::spike::Directive>,
    /// Processes reset in place, waiting for the next gang (by local rank).
    live: Vec<Option<ActorRef<RankProcessMsg>>>,
    /// The next gang's rendezvous listener, bound in advance so survivors know where to go.
    next_listener: Option<tokio::net::TcpListener>,
    /// The last failure's culprits (global ranks): the node agents replace theirs when the next gang forms.
    culprits: Vec<usize>,
    /// Other nodes' ranks the ended gang could not reset (no acknowledgement, or no channel yet): culprits too.
    unreached: Vec<usize>,
    /// What goes to each node agent (a writer task per node sends it in order).
    to_nodes: Vec<tokio::sync::mpsc::UnboundedSender<RootMsg>>,
    /// The writer tasks, awaited when the supervisor stops so that the last word reaches every node.
    node_writers: Vec<tokio::task::JoinHandle<()>>,
    outcome: Option<oneshot::Sender<Result<GangReport, LaunchError>>>,
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        mut args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let (tx, _) = oneshot::channel();
        let outcome = Some(std::mem::replace(&mut args.outcome, tx));
        let mut s = SupervisorState {
            args,
            attempt: 0,
            restarts: vec![],
            last_step: 0,
            recovering: None,
            detected: None,
            gang: None,
            preempting: false,
            outage: None,
            outage_since: None,
            started: Instant::now(),
            down_s: 0.0,
            lost_total: 0,
            ledger: vec![],
            directive: None,
            live: vec![],
            next_listener: None,
            culprits: vec![],
            unreached: vec![],
            to_nodes: vec![],
            node_writers: vec![],
            outcome,
        };
        let silence = policy::node_silence(s.args.hang_timeout);
        for agent in std::mem::take(&mut s.args.nodes) {
            if let Some(m) = &s.args.metrics {
                heard_from(m, agent.enlist.node_rank);
            }
            let (tx, writer) = connect_node(&myself, agent, silence);
            s.to_nodes.push(tx);
            s.node_writers.push(writer);
        }
        s.ledger = s.args.events.spike_ledger();
        start_gang(&myself, &mut s, false, None).await?;
        Ok(s)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        s: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let (SupervisorMsg::FromNode(node, _), Some(m)) = (&msg, &s.args.metrics) {
            heard_from(m, *node);
        }
        match msg {
            SupervisorMsg::News(attempt, _) if attempt != s.attempt => {} // a previous gang's, late
            SupervisorMsg::News(_, GangNews::Fault(reason)) => {
                s.detected = Some(Instant::now());
                s.args
                    .events
                    .log("detected", json!({"attempt": s.attempt, "reason": reason, "last_step": s.last_step}));
            }
            SupervisorMsg::News(_, GangNews::Resumed(step)) => {
                let mut record = json!({"attempt": s.attempt, "step": step});
                if let Some(r) = s.recovering.as_mut() {
                    if r.resumed_at != step {
                        // A commit landed while the gang restarted (the previous attempt's coordinator
                        // finishing it): the ranks resumed from it, and fewer steps were lost.
                        crate::say!(
                            "tessera launch: the gang resumed from its checkpoint after step {step} (committed while \
                             it restarted), not after step {}",
                            r.resumed_at
                        );
                        (r.resumed_at, r.lost) = (step, s.last_step.saturating_sub(step));
                    }
                    record["lost_steps"] = json!(r.lost);
                }
                s.args.events.log("resumed", record);
            }
            SupervisorMsg::News(_, GangNews::Step(step)) => {
                if s.attempt == 1 && s.last_step == 0 {
                    // The launch's first completed step (after a relaunch: the first since it).
                    s.args.events.log("first_step", json!({"attempt": 1, "step": step}));
                }
                s.last_step = s.last_step.max(step);
                if let Some(m) = &s.args.metrics {
                    let wall = s.started.elapsed().as_secs_f64();
                    let step_s = (wall - s.down_s).max(0.0) / (s.last_step + s.lost_total).max(1) as f64;
                    let useful = (wall - s.down_s - s.lost_total as f64 * step_s).max(0.0);
                    m.goodput_ratio.set(if wall > 0.0 { useful / wall } else { 1.0 });
                }
                if let Some(r) = s.recovering.as_ref().filter(|r| step > r.resumed_at) {
                    let secs = r.detected.elapsed().as_secs_f64();
                    s.args.events.log(
                        "recovered",
                        json!({"attempt": s.attempt, "step": step, "resumed_at": r.resumed_at,
                               "recover_s": secs, "lost_steps": r.lost}),
                    );
                    crate::say!(
                        "tessera launch: recovered: step {step} completed {secs:.1} s after the fault was detected \
                         ({} step(s) lost)",
                        r.lost
                    );
                    s.down_s += secs;
                    s.lost_total += r.lost;
                    if let Some(m) = &s.args.metrics {
                        m.recover_seconds.observe(secs);
                        m.lost_steps.inc_by(r.lost);
                    }
                    s.recovering = None;
                    s.outage_since = None;
                }
            }
            SupervisorMsg::Handover(live, unreached) => (s.live, s.unreached) = (live, unreached),
            SupervisorMsg::FromNode(_, NodeMsg::Exited { rank, attempt, success, how }) => {
                // An exit from an earlier gang (a culprit killed for this one) is old news.
                if let Some(g) = s.gang.as_ref().filter(|_| attempt == s.attempt as u64) {
                    let _ = g.cast(super::gang::GangMsg::Exited { rank, success, how });
                }
            }
            SupervisorMsg::FromNode(_, NodeMsg::Alive) => {}
            SupervisorMsg::FromNode(node, NodeMsg::Preempt) => {
                crate::say!("tessera launch: node {node} was asked to stop: preempting the run");
                let _ = myself.cast(SupervisorMsg::Preempt);
            }
            SupervisorMsg::NodeLost(node, why) => {
                let e = LaunchError::Setup(format!(
                    "node {node}'s launcher went away ({why}: its host is down, frozen or cut off, or the launcher \
                     was killed), so its ranks can no longer be supervised or replaced; run the launch again on \
                     every node (it resumes from the newest checkpoint)"
                ));
                match &s.gang {
                    Some(g) => {
                        let _ = g.cast(super::gang::GangMsg::Fail(e));
                    }
                    None => finish(&myself, s, Err(e)),
                }
            }
            SupervisorMsg::Preempt => {
                s.preempting = true;
                s.args.events.log("preempt_requested", json!({"attempt": s.attempt, "last_step": s.last_step}));
                if let Some(g) = &s.gang {
                    let _ = g.cast(super::gang::GangMsg::Preempt);
                } else if let Some(o) = &s.outage {
                    // No gang to checkpoint: the run stops where its newest committed checkpoint is.
                    let waited_s = s.outage_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
                    let last = if o.last.is_empty() { o.reason.clone() } else { o.last.clone() };
                    s.args
                        .events
                        .log("gave_up", json!({"reason": "preempted while waiting for storage", "waited_s": waited_s}));
                    finish(&myself, s, Err(LaunchError::PreemptedWaiting { waited_s, last }));
                }
            }
            SupervisorMsg::ProbeStorage => probe(&myself, s),
            SupervisorMsg::ProbeDone(answer) => probed(&myself, s, answer).await,
            SupervisorMsg::Ended(Ok(report)) => {
                let event = if report.preempted { "preempted" } else { "finished" };
                s.args.events.log(event, json!({"attempt": s.attempt, "steps": report.steps}));
                finish(&myself, s, Ok(report));
            }
            SupervisorMsg::Ended(Err(e)) => {
                let now = Instant::now();
                s.gang = None;
                let (kind, ranks) = match &e {
                    LaunchError::RankFailed { rank, .. } => ("rank_failed", vec![*rank]),
                    LaunchError::StorageUnavailable { rank, .. } => ("storage", vec![*rank]),
                    LaunchError::Unrecoverable { rank, .. } => ("unrecoverable", vec![*rank]),
                    LaunchError::Hung { ranks, .. } | LaunchError::NeverJoined { ranks, .. } => ("hung", ranks.clone()),
                    LaunchError::Anomaly(a) => match a.as_ref() {
                        crate::spike::Anomaly::Spike(_) => ("spike", vec![]),
                        crate::spike::Anomaly::RankFault { fault, .. } => ("rank_fault", vec![fault.rank]),
                    },
                    _ => ("fatal", vec![]),
                };
                s.culprits = super::gang::culprits(&e).unwrap_or_default();
                s.culprits.extend(std::mem::take(&mut s.unreached));
                s.args.events.log(
                    "fault",
                    json!({"attempt": s.attempt, "kind": kind, "ranks": ranks, "reason": e.to_string(),
                           "last_step": s.last_step}),
                );
                if matches!(kind, "fatal" | "unrecoverable") || s.preempting {
                    finish(&myself, s, Err(e));
                    return Ok(());
                }
                if let LaunchError::Anomaly(a) = e {
                    roll_back(&myself, s, &a, kind).await;
                    return Ok(());
                }
                if kind == "storage" {
                    wait_for_storage(&myself, s, s.detected.unwrap_or(now), e.to_string(), None, "storage", None);
                    return Ok(());
                }
                match policy::on_fault(&s.args.policy, &s.restarts, now) {
                    RestartDecision::GiveUp { restarts } => {
                        let window_s = s.args.policy.window.as_secs_f64();
                        s.args.events.log("gave_up", json!({"restarts": restarts, "window_s": window_s}));
                        finish(&myself, s, Err(LaunchError::GaveUp { restarts, window_s, last: Box::new(e) }));
                    }
                    RestartDecision::Restart { n } => {
                        s.restarts.push(now);
                        restart(&myself, s, e.to_string(), kind, Some(n)).await;
                    }
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        s: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // The last word to every node (how the launch ended) is on its way: let it arrive.
        s.to_nodes.clear();
        for w in s.node_writers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        _s: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // A gang that dies without reporting is a bug in it; the launch cannot continue safely.
        if let SupervisionEvent::ActorFailed(_, err) = evt {
            let _ = myself.cast(SupervisorMsg::Ended(Err(LaunchError::Setup(format!("the gang actor failed: {err}")))));
        }
        Ok(())
    }
}

fn finish(myself: &ActorRef<SupervisorMsg>, s: &mut SupervisorState, result: Result<GangReport, LaunchError>) {
    // Survivors waiting for a gang that will not come.
    for p in s.live.drain(..).flatten() {
        p.stop(Some("the launch ended".into()));
    }
    // Every node stops too, with the same outcome and exit code.
    let outcome = match &result {
        Ok(r) => Ok(Finished { steps: r.steps, final_loss: r.final_loss, preempted: r.preempted }),
        Err(e) => Err(Failed { code: e.exit_code(), message: e.to_string() }),
    };
    for node in &s.to_nodes {
        let _ = node.send(RootMsg::Stop { outcome: outcome.clone() });
    }
    if let Some(tx) = s.outcome.take() {
        let _ = tx.send(result);
    }
    myself.stop(None);
}

/// Serves one node agent's connection for the launch: what it says arrives as [`SupervisorMsg::FromNode`]
/// (its loss, or `silence` without a word, as [`SupervisorMsg::NodeLost`]); what is sent on the returned
/// channel goes to it in order, with a heartbeat whenever there is nothing else to say. The writer task ends
/// when the channel closes.
fn connect_node(
    myself: &ActorRef<SupervisorMsg>,
    agent: crate::launch::rendezvous::Agent,
    silence: Duration,
) -> (tokio::sync::mpsc::UnboundedSender<RootMsg>, tokio::task::JoinHandle<()>) {
    let node = agent.enlist.node_rank;
    let (mut read, mut write) = agent.stream.into_split();
    let (heard, lost) = (myself.clone(), myself.clone());
    tokio::spawn(async move {
        protocol::read_until_silent(
            &mut read,
            silence,
            silence,
            |msg| drop(heard.cast(SupervisorMsg::FromNode(node, msg))),
            |why| drop(lost.cast(SupervisorMsg::NodeLost(node, why))),
        )
        .await;
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<RootMsg>();
    let writer = tokio::spawn(async move {
        loop {
            let msg = match tokio::time::timeout(protocol::NODE_HEARTBEAT, rx.recv()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => return,
                Err(_) => RootMsg::Alive,
            };
            if protocol::send_async(&mut write, &msg).await.is_err() {
                return;
            }
        }
    });
    (tx, writer)
}

/// Records that node `node`'s launcher was heard from now.
fn heard_from(m: &super::metrics_exporter::Metrics, node: usize) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    m.node_last_heard_timestamp_seconds
        .get_or_create(&super::metrics_exporter::NodeLabel { node: node.to_string() })
        .set(now);
}

/// How long the supervisor gives one look at the storage before it counts as no answer: the storage client
/// retries a silent server for minutes, and meanwhile the launch must go on hearing preemption and its nodes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs blocking storage I/O on the blocking pool, for at most [`PROBE_TIMEOUT`]: its result, or no answer
/// (unavailable). A call that outlasts the deadline finishes on its thread, unheard.
async fn within_deadline<T: Send + 'static>(
    io: impl FnOnce() -> Result<T, (String, bool)> + Send + 'static,
) -> Result<T, (String, bool)> {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::task::spawn_blocking(io)).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err((format!("the storage call failed: {e}"), false)),
        Err(_) => Err((format!("no answer within {} s", PROBE_TIMEOUT.as_secs()), true)),
    }
}

/// The newest committed checkpoint's step (0 if none), or why the store cannot say and whether it is
/// unavailable (worth waiting for).
async fn newest_step(store: &Option<Arc<CkptStore>>) -> Result<u64, (String, bool)> {
    let Some(store) = store.clone() else { return Err(("it did not open".into(), false)) };
    within_deadline(move || match store.newest_committed_step() {
        Ok(step) => Ok(step.unwrap_or(0)),
        Err(e) => {
            let unavailable = matches!(&e, crate::ckpt::store::CkptError::Storage(s) if s.is_unavailable());
            Err((e.to_string(), unavailable))
        }
    })
    .await
}

/// Whether the storage the ranks need answers: the checkpoint store lists, and a remote corpus's index is
/// there.
async fn storage_answers(
    (store, corpus, options): (Option<Arc<CkptStore>>, String, Vec<(String, String)>),
) -> Result<(), String> {
    within_deadline(move || {
        if let Some(store) = &store {
            store.newest_committed_step().map_err(|e| (e.to_string(), true))?;
        }
        if crate::storage::is_url(&corpus) {
            let store = crate::storage::Store::open(&corpus, &options).map_err(|e| (e.to_string(), false))?;
            store.exists(crate::data::shards::INDEX_FILE).map_err(|e| (e.to_string(), true))?;
        }
        Ok(())
    })
    .await
    .map_err(|(e, _)| e)
}

/// Restarts the gang after a fault (`reason`, of `kind`) from the newest committed checkpoint: restart
/// number `n` within the window, or `None` when it is not counted (storage that did not answer). If the
/// checkpoint store does not answer now, waits for it first.
async fn restart(
    myself: &ActorRef<SupervisorMsg>,
    s: &mut SupervisorState,
    reason: String,
    kind: &'static str,
    n: Option<usize>,
) {
    let now = Instant::now();
    let newest = match newest_step(&s.args.store).await {
        Err((e, true)) => {
            let cause = format!("the checkpoint store does not answer: {e}");
            wait_for_storage(myself, s, now, reason, Some(cause), kind, n);
            return;
        }
        other => other.map_err(|(e, _)| e),
    };
    // Unknown while the store cannot be listed: the ranks will find the newest themselves.
    let resumed_at = newest.as_ref().ok().copied();
    let lost = resumed_at.map(|r| s.last_step.saturating_sub(r));
    let from = match newest {
        Ok(0) => "the start (no checkpoint committed yet)".into(),
        Ok(step) => format!("its checkpoint after step {step}"),
        Err(e) => format!("its newest committed checkpoint (the store cannot be listed now: {e})"),
    };
    let count = match n {
        Some(n) => format!(
            "restart {n} of at most {} within {:.0} s",
            s.args.policy.max_restarts,
            s.args.policy.window.as_secs_f64()
        ),
        None => "not counted as a restart: the storage failed, not the gang".into(),
    };
    crate::say!("tessera launch: {reason}; restarting the gang from {from} ({count})");
    let in_place: Vec<usize> = s.live.iter().enumerate().filter(|(_, p)| p.is_some()).map(|(l, _)| l).collect();
    s.args.events.log(
        "restart",
        json!({"attempt": s.attempt + 1, "n": n, "reason": kind, "resume_from_step": resumed_at, "lost_steps": lost,
               "reset_in_place": in_place, "replaced": &s.culprits}),
    );
    if let Some(m) = &s.args.metrics {
        let label = super::metrics_exporter::ReasonLabel { reason: kind.to_string() };
        m.restarts.get_or_create(&label).inc();
        m.rollbacks.get_or_create(&label).inc();
    }
    // Provisional where the store could not say: rank 0 reports where it resumed (`Resumed`).
    let at = resumed_at.unwrap_or(0);
    let detected = s.detected.take().unwrap_or(now);
    s.recovering = Some(Recovery { detected, resumed_at: at, lost: s.last_step.saturating_sub(at) });
    // A rollback whose target is still the newest checkpoint has not been saved with its new data order
    // yet: carry it out again.
    let redo = s.directive.filter(|d| Some(d.target) == resumed_at);
    // Ranks resume from the newest committed checkpoint, unless there is surely none.
    if let Err(e) = start_gang(myself, s, resumed_at != Some(0), redo).await {
        finish(myself, s, Err(LaunchError::Setup(format!("cannot restart the gang: {e}"))));
    }
}

/// Starts waiting for storage that does not answer: the next gang starts once it answers ([`probe`]).
/// `reason` is the failure that needs a restart (the storage's own, or a crash whose restart found the
/// checkpoint store unreachable: `cause`); the storage was found unreachable at `since`, unless an outage
/// is already being waited out (a gang that failed on it again before completing a step).
fn wait_for_storage(
    myself: &ActorRef<SupervisorMsg>,
    s: &mut SupervisorState,
    since: Instant,
    reason: String,
    cause: Option<String>,
    kind: &'static str,
    counted: Option<usize>,
) {
    let since = *s.outage_since.get_or_insert(since);
    let budget = s.args.cfg.launch.storage_wait_s;
    let why = match &cause {
        Some(c) => format!("{reason}; {c}"),
        None => reason.clone(),
    };
    let counts = match counted {
        Some(n) => format!("restart {n} counts for the failure, the wait does not"),
        None => "not counted as a restart".into(),
    };
    crate::say!(
        "tessera launch: {why}; waiting for the storage to answer (up to {budget:.0} s, launch.storage_wait_s; \
         {counts}), then restarting the gang from the newest committed checkpoint"
    );
    s.args.events.log(
        "storage_wait",
        json!({"attempt": s.attempt, "reason": why, "waited_s": since.elapsed().as_secs_f64(), "budget_s": budget}),
    );
    let said = Instant::now();
    s.outage =
        Some(Outage { reason, kind, counted, last: String::new(), said, delay: Duration::ZERO, released: false });
    let _ = myself.cast(SupervisorMsg::ProbeStorage);
}

/// Asks the storage again, off the actor (a silent store must not keep the supervisor from hearing a
/// preemption): the answer comes back as [`SupervisorMsg::ProbeDone`].
fn probe(myself: &ActorRef<SupervisorMsg>, s: &SupervisorState) {
    if s.outage.is_none() || s.preempting {
        return;
    }
    let args = (s.args.store.clone(), s.args.cfg.data_path.clone(), s.args.cfg.storage_options.clone());
    let me = myself.clone();
    tokio::spawn(async move {
        let answer = storage_answers(args).await;
        let _ = me.cast(SupervisorMsg::ProbeDone(answer));
    });
}

/// What a probe found: restarts the gang if the storage answers, gives up past `launch.storage_wait_s`, or
/// asks again later (backing off from 1 s to 30 s).
async fn probed(myself: &ActorRef<SupervisorMsg>, s: &mut SupervisorState, answer: Result<(), String>) {
    if s.outage.is_none() || s.preempting {
        return;
    }
    let since = *s.outage_since.get_or_insert_with(Instant::now);
    let waited_s = since.elapsed().as_secs_f64();
    match answer {
        Ok(()) => {
            let o = s.outage.take().expect("checked above");
            s.args.events.log("storage_back", json!({"attempt": s.attempt, "waited_s": waited_s}));
            crate::say!("tessera launch: the storage answers again after {waited_s:.0} s");
            restart(myself, s, o.reason, o.kind, o.counted).await;
        }
        Err(e) if waited_s >= s.args.cfg.launch.storage_wait_s => {
            s.args.events.log("gave_up", json!({"reason": "storage", "waited_s": waited_s, "last": &e}));
            finish(myself, s, Err(LaunchError::StorageGaveUp { waited_s, last: e }));
        }
        Err(e) => {
            // Survivors would outlast their rendezvous: let them go, on every node; the next gang starts every
            // rank afresh.
            let o = s.outage.as_mut().expect("checked above");
            if !o.released {
                o.released = true;
                for p in s.live.drain(..).flatten() {
                    p.stop(Some("the launch waits for storage".into()));
                }
                for node in &s.to_nodes {
                    let _ = node.send(RootMsg::Release);
                }
            }
            if o.last.is_empty() || o.said.elapsed() >= Duration::from_secs(60) {
                crate::say!(
                    "tessera launch: still waiting for the storage ({waited_s:.0} s of at most {:.0} s): {e}",
                    s.args.cfg.launch.storage_wait_s
                );
                o.said = Instant::now();
            }
            o.last = e;
            o.delay = (o.delay * 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
            myself.send_after(o.delay, || SupervisorMsg::ProbeStorage);
        }
    }
}

/// Plans the response to a spike or faulty rank and carries it out: a fresh gang that rolls back, or the end
/// of the run when rollbacks stopped helping.
async fn roll_back(myself: &ActorRef<SupervisorMsg>, s: &mut SupervisorState, a: &crate::spike::Anomaly, kind: &str) {
    let now = Instant::now();
    let Some(store) = s.args.store.clone() else {
        finish(myself, s, Err(LaunchError::Setup(format!("{a}; cannot roll back: the checkpoint store did not open"))));
        return;
    };
    // Lists, reads and removes checkpoints (blocking storage I/O): the runtime moves its other work meanwhile.
    let response = match tokio::task::block_in_place(|| crate::spike::respond(&store, &s.args.cfg, &s.ledger, a)) {
        Ok(r) => r,
        Err(e) => {
            finish(myself, s, Err(LaunchError::Setup(format!("{a}; cannot roll back: {e}"))));
            return;
        }
    };
    match response.plan {
        crate::spike::Plan::GiveUp { reason } => {
            s.args.events.log("gave_up", json!({"reason": reason}));
            finish(myself, s, Err(LaunchError::SpikeGaveUp(reason)));
        }
        crate::spike::Plan::Rollback { directive, entry } => {
            crate::say!("tessera launch: {a}");
            crate::say!("tessera launch: {}", crate::spike::rollback::describe(&entry));
            // Rank 0 completed at least the step it detected the anomaly at, and up to the reading that found
            // it (its heartbeat says which, if it arrived first).
            let lost = s.last_step.max(a.step() + 1).saturating_sub(directive.target);
            s.args.events.log(
                "spike",
                json!({"attempt": s.attempt + 1, "ledger": &entry, "removed_checkpoints": response.removed,
                       "lost_steps": lost}),
            );
            s.args.events.log(
                "restart",
                json!({"attempt": s.attempt + 1, "reason": kind, "resume_from_step": directive.target, "lost_steps": lost}),
            );
            if let Some(m) = &s.args.metrics {
                let reason = super::metrics_exporter::ReasonLabel { reason: kind.to_string() };
                m.restarts.get_or_create(&reason).inc();
                m.rollbacks.get_or_create(&reason).inc();
            }
            s.ledger.push(entry);
            s.directive = Some(directive);
            s.recovering =
                Some(Recovery { detected: s.detected.take().unwrap_or(now), resumed_at: directive.target, lost });
            if let Err(e) = start_gang(myself, s, false, Some(directive)).await {
                finish(myself, s, Err(LaunchError::Setup(format!("cannot restart the gang: {e}"))));
            }
        }
    }
}

/// Starts the next gang. A restarted gang resumes from the newest committed checkpoint of this run
/// (`resume = "auto"`), whatever the first one was told, or carries out `rollback`.
async fn start_gang(
    myself: &ActorRef<SupervisorMsg>,
    s: &mut SupervisorState,
    resume_auto: bool,
    rollback: Option<crate::spike::Directive>,
) -> Result<(), ActorProcessingErr> {
    s.attempt += 1;
    // Every gang's rendezvous listens on the first one's host (where every node reaches node 0).
    let host = std::net::SocketAddr::new(s.args.rdzv_addr.ip(), 0);
    let listener = match (s.args.rdzv.take(), s.next_listener.take()) {
        (Some(l), _) | (None, Some(l)) => l,
        (None, None) => tokio::net::TcpListener::bind(host).await?,
    };
    let addr = std::net::SocketAddr::new(s.args.rdzv_addr.ip(), listener.local_addr()?.port());
    // Where this gang's survivors will go if it fails: the next gang's rendezvous, bound now.
    let next = tokio::net::TcpListener::bind(host).await?;
    let next_port = Some(next.local_addr()?.port());
    s.next_listener = Some(next);
    // How every rank starts, survivors and new processes alike: a restarted gang resumes from the newest
    // committed checkpoint of this run (`resume = "auto"`), whatever the first one was told.
    let start = crate::launch::protocol::StartSpec {
        resume: if resume_auto { "auto".into() } else { s.args.cfg.resume.clone() },
        rollback,
        attempt: s.attempt as u64,
    };
    let (tx, rx) = oneshot::channel();
    let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel();
    let args = GangArgs {
        ranks: s.args.ranks.clone(),
        rdzv: Some(listener),
        rdzv_addr: addr,
        rdzv_timeout: s.args.rdzv_timeout,
        hang_timeout: s.args.hang_timeout,
        progress: Some(ptx),
        metrics: s.args.metrics.clone(),
        start,
        live: std::mem::take(&mut s.live),
        next_port,
        outcome: tx,
    };
    let (gang, _) = Actor::spawn_linked(None, Gang, args, myself.get_cell()).await?;
    if s.preempting {
        // A preemption that came between gangs: this one checkpoints and stops as soon as its ranks join.
        let _ = gang.cast(super::gang::GangMsg::Preempt);
    }
    s.gang = Some(gang);
    // The other nodes start their part of it: replacements for the culprits, everyone at the first gang.
    let culprits = std::mem::take(&mut s.culprits);
    for node in &s.to_nodes {
        let _ = node.send(RootMsg::Gang { attempt: s.attempt as u64, port: addr.port(), culprits: culprits.clone() });
    }
    let (me, attempt) = (myself.clone(), s.attempt);
    tokio::spawn(async move {
        while let Some(news) = prx.recv().await {
            let _ = me.cast(SupervisorMsg::News(attempt, news));
        }
    });
    let me = myself.clone();
    tokio::spawn(async move {
        let end = rx.await.unwrap_or_else(|_| super::gang::GangEnd {
            result: Err(LaunchError::Setup("the gang stopped without a result".into())),
            live: vec![],
            unreached: vec![],
        });
        let _ = me.cast(SupervisorMsg::Handover(end.live, end.unreached));
        let _ = me.cast(SupervisorMsg::Ended(end.result));
    });
    Ok(())
}
