//! The node agent: what `tessera launch` is on nodes 1, 2, ... of a multi-node run.
//!
//! Node 0's launcher is the root: its supervisor decides every restart and rollback for the whole run, and
//! its gang holds every rank's control channel (the ranks of all nodes join its rendezvous). What it cannot
//! do from another machine is start, kill and watch processes there. The agent does that for its node, on
//! node 0's word, over one authenticated connection that lasts the whole launch:
//! - [`RootMsg::Gang`]: a gang forms at node 0's rendezvous on this port. The agent kills the local culprits
//!   of the last failure and starts a process for every local rank without one. Ranks that survived were told
//!   by node 0 to reset in place and join by themselves, keeping libtorch and their CUDA context, as on node 0.
//! - A local process ends: the agent tells node 0 ([`NodeMsg::Exited`], tagged with the gang it served), whose
//!   gang treats it as it treats its own ranks' exits. A process killed as a culprit served an earlier gang,
//!   so its exit is not taken for a failure of the next one.
//! - [`RootMsg::Release`]: node 0 waits for storage before the next gang: the agent stops its survivors now
//!   (they would outlast their rendezvous), and the next gang starts them afresh.
//! - [`RootMsg::Stop`]: the launch is over. The agent gives its processes 5 s to exit by themselves (node 0
//!   told them to finish or abort), kills what is left, and ends with node 0's outcome and exit code.
//! - SIGTERM or SIGINT on this node: the agent asks node 0 to preempt the whole run ([`NodeMsg::Preempt`]).
//!
//! Both sides send a heartbeat every second when they have nothing else to say. If node 0's launcher goes
//! away or falls silent ([`super::policy::node_silence`]), the agent kills its processes and fails: nobody is
//! left to decide. If this node's launcher goes away or falls silent (its host died, froze or was cut off),
//! node 0 stops the run, since its ranks can no longer be replaced.

use super::policy::{self, NodeAction};
use super::rank_process::{NodeRanks, Owner, RankProcessMsg};
use crate::launch::protocol::{self, Finished, NodeMsg, RootMsg};
use crate::launch::LaunchError;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::oneshot;

/// How long local processes get to exit by themselves once node 0 has stopped the launch.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// This node's share of the run.
pub struct NodeSpec {
    /// This node's ranks and how to start them.
    pub ranks: NodeRanks,
    /// Node 0's rendezvous as this node reaches it; each gang's port replaces the port.
    pub rdzv: SocketAddr,
    pub node_rank: usize,
    /// Silence from node 0's launcher that counts as its loss ([`super::policy::node_silence`]).
    pub silence: Duration,
    /// `launch.rdzv_timeout_s`: how long node 0 may wait for the other nodes before the first gang.
    pub rdzv_timeout: Duration,
}

pub struct NodeAgentArgs {
    pub node: NodeSpec,
    /// The enlisted connection to node 0's launcher.
    pub root: tokio::net::TcpStream,
    pub outcome: oneshot::Sender<Result<Finished, LaunchError>>,
}

pub enum NodeAgentMsg {
    FromRoot(RootMsg),
    /// The connection to node 0 closed or failed.
    RootLost(String),
    /// A local process ended (`process` is its actor's id, which tells a replaced process from its successor).
    Exited {
        rank: usize,
        process: ActorId,
        success: bool,
        how: String,
    },
    /// SIGTERM or SIGINT on this node.
    Preempt,
    /// The stop's grace period is over: kill what still runs and end.
    Finish,
    /// Time to tell node 0 this launcher is alive.
    Beat,
}

pub struct NodeAgent;

/// A local rank's process and the gang it serves.
struct Slot {
    process: ActorRef<RankProcessMsg>,
    attempt: u64,
}

pub struct NodeAgentState {
    a: NodeSpec,
    to_root: OwnedWriteHalf,
    slots: Vec<Option<Slot>>,
    /// Set by [`RootMsg::Stop`] (or the loss of node 0): how this node's launch ends, once its processes have.
    ending: Option<Result<Finished, LaunchError>>,
    outcome: Option<oneshot::Sender<Result<Finished, LaunchError>>>,
}

impl Actor for NodeAgent {
    type Msg = NodeAgentMsg;
    type State = NodeAgentState;
    type Arguments = NodeAgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<NodeAgentMsg>,
        args: NodeAgentArgs,
    ) -> Result<NodeAgentState, ActorProcessingErr> {
        let NodeAgentArgs { node: a, root, outcome } = args;
        let (mut read, to_root) = root.into_split();
        let (heard, lost, silence) = (myself.clone(), myself.clone(), a.silence);
        // Node 0 speaks first once every node has enlisted, which may take the rendezvous timeout.
        let first = a.rdzv_timeout + silence;
        tokio::spawn(async move {
            protocol::read_until_silent(
                &mut read,
                first,
                silence,
                |msg| drop(heard.cast(NodeAgentMsg::FromRoot(msg))),
                |why| drop(lost.cast(NodeAgentMsg::RootLost(why))),
            )
            .await;
        });
        myself.send_interval(protocol::NODE_HEARTBEAT, || NodeAgentMsg::Beat);
        let slots = (0..a.ranks.nproc).map(|_| None).collect();
        Ok(NodeAgentState { a, to_root, slots, ending: None, outcome: Some(outcome) })
    }

    async fn handle(
        &self,
        myself: ActorRef<NodeAgentMsg>,
        msg: NodeAgentMsg,
        s: &mut NodeAgentState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeAgentMsg::FromRoot(RootMsg::Gang { attempt, port, culprits }) => {
                let mine: Vec<usize> = culprits.iter().copied().filter(|&r| s.a.ranks.local(r).is_some()).collect();
                if attempt > 1 {
                    let how = if mine.is_empty() {
                        "its ranks reset in place".to_string()
                    } else {
                        format!("replacing rank(s) {mine:?}, the others reset in place")
                    };
                    crate::say!("tessera launch: node {}: gang {attempt} forms; {how}", s.a.node_rank);
                }
                let alive: Vec<bool> = s.slots.iter().map(Option::is_some).collect();
                let rdzv = SocketAddr::new(s.a.rdzv.ip(), port);
                let plan = policy::node_plan(s.a.ranks.first_rank, &alive, &culprits);
                for (local, action) in plan.into_iter().enumerate() {
                    match action {
                        NodeAction::Adopt => {
                            if let Some(slot) = s.slots[local].as_mut() {
                                slot.attempt = attempt;
                            }
                            continue;
                        }
                        NodeAction::Replace => {
                            if let Some(old) = s.slots[local].take() {
                                old.process.stop(Some("culprit".into()));
                            }
                        }
                        NodeAction::Start => {}
                    }
                    let rank = s.a.ranks.first_rank + local;
                    match s.a.ranks.start(local, rdzv, Owner::Agent(myself.clone())).await {
                        Ok(process) => s.slots[local] = Some(Slot { process, attempt }),
                        Err(e) => {
                            // Node 0 counts it as that rank's failure, and restarts or gives up as for any.
                            let how = format!("could not be started: {e}");
                            let _ = protocol::send_async(
                                &mut s.to_root,
                                &NodeMsg::Exited { rank, attempt, success: false, how },
                            )
                            .await;
                        }
                    }
                }
            }
            NodeAgentMsg::FromRoot(RootMsg::Release) => {
                for slot in s.slots.iter_mut().filter_map(Option::take) {
                    slot.process.stop(Some("the launch waits for storage".into()));
                }
            }
            NodeAgentMsg::FromRoot(RootMsg::Stop { outcome }) => {
                s.ending = Some(outcome.map_err(|f| LaunchError::StoppedByNode0 { code: f.code, message: f.message }));
                if s.slots.iter().all(Option::is_none) {
                    finish(&myself, s);
                } else {
                    myself.send_after(STOP_GRACE, || NodeAgentMsg::Finish);
                }
            }
            NodeAgentMsg::RootLost(why) => {
                if s.ending.is_none() {
                    s.ending = Some(Err(LaunchError::Setup(format!(
                        "lost node 0's launcher ({why}); this node's ranks were stopped, since nobody is left to \
                         supervise them. Run the launch again on every node: it resumes from the newest checkpoint"
                    ))));
                    finish(&myself, s);
                }
            }
            NodeAgentMsg::Exited { rank, process, success, how } => {
                let Some(local) = s.a.ranks.local(rank) else {
                    return Ok(());
                };
                if s.slots[local].as_ref().is_some_and(|slot| slot.process.get_id() == process) {
                    let attempt = s.slots[local].take().map_or(0, |slot| slot.attempt);
                    let _ =
                        protocol::send_async(&mut s.to_root, &NodeMsg::Exited { rank, attempt, success, how }).await;
                }
                if s.ending.is_some() && s.slots.iter().all(Option::is_none) {
                    finish(&myself, s);
                }
            }
            NodeAgentMsg::Preempt => {
                let _ = protocol::send_async(&mut s.to_root, &NodeMsg::Preempt).await;
            }
            NodeAgentMsg::Finish => finish(&myself, s),
            NodeAgentMsg::Beat => {
                let _ = protocol::send_async(&mut s.to_root, &NodeMsg::Alive).await;
            }
            NodeAgentMsg::FromRoot(RootMsg::Alive) => {}
        }
        Ok(())
    }
}

/// Kills what still runs and reports how this node's launch ended.
fn finish(myself: &ActorRef<NodeAgentMsg>, s: &mut NodeAgentState) {
    for slot in s.slots.iter_mut().filter_map(Option::take) {
        slot.process.stop(Some("the launch ended".into()));
    }
    if let (Some(tx), Some(ending)) = (s.outcome.take(), s.ending.take()) {
        let _ = tx.send(ending);
    }
    myself.stop(None);
}
