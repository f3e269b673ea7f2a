//! The rendezvous: how N rank processes (on one or several nodes) find each other.
//!
//! The launcher of node 0 listens (loopback unless configured otherwise). Each worker connects, proves it
//! knows the run's secret (HMAC challenge, `comm::auth`), and sends a [`Join`]: its rank, the world size it
//! expects, the hash of its resolved config and where its communicator listens. When all ranks have joined
//! and agree, every worker receives the full address list ([`LauncherMsg::Peers`]); the connection then stays
//! open as that worker's control channel. Ranks that disagree (world size, duplicate rank, config hash) are all
//! sent [`LauncherMsg::Reject`] naming the culprits, and the launch fails; ranks that never arrive are named
//! when the deadline passes.
//!
//! With several nodes, the other nodes' launchers come first: each enlists ([`enlist`], [`muster`]) with the
//! same handshake and stays connected as its node's agent for the whole launch.

use super::protocol::{self, Enlist, Failed, Join, LauncherMsg, RootMsg, WorkerMsg, RDZV_LABEL};
use super::LaunchError;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use tokio::net::TcpStream as AsyncStream;

/// A joined rank's control connection, as the launcher holds it.
pub struct Member {
    pub join: Join,
    pub stream: AsyncStream,
    pub peer: SocketAddr,
}

/// Challenges a new connection (async side of `comm::auth::challenge`).
async fn authenticate(stream: &mut AsyncStream, secret: &[u8]) -> std::io::Result<()> {
    use hmac::Mac;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    stream.write_all(&nonce).await?;
    let mut answer = [0u8; 32];
    stream.read_exact(&mut answer).await?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(RDZV_LABEL);
    mac.update(&nonce);
    mac.verify_slice(&answer).map_err(|_| std::io::Error::new(std::io::ErrorKind::PermissionDenied, "wrong run secret"))
}

/// Connections in their handshake at once; more are refused until some finish.
const MAX_HANDSHAKES: usize = 256;

/// The rendezvous side of new connections: each one's handshake (the secret's challenge, then its first
/// message, within 10 s) runs on its own, so a peer that connects and says nothing delays no one else.
struct Acceptor<'a> {
    listener: &'a tokio::net::TcpListener,
    secret: std::sync::Arc<[u8]>,
    pending: futures_util::stream::FuturesUnordered<futures_util::future::BoxFuture<'static, Handshake>>,
}

/// A handshake's end: the peer, and its stream and first message, or why it was refused.
type Handshake = (SocketAddr, Result<(AsyncStream, WorkerMsg), String>);

impl<'a> Acceptor<'a> {
    fn new(listener: &'a tokio::net::TcpListener, secret: &[u8]) -> Self {
        Acceptor { listener, secret: secret.into(), pending: Default::default() }
    }

    /// The next connection that authenticates and sends its first message before `deadline`: the stream,
    /// the peer and that message; `None` when the deadline passes. Connections that fail the handshake are
    /// reported to `on_refused` and dropped.
    async fn next(
        &mut self,
        deadline: tokio::time::Instant,
        on_refused: &mut impl FnMut(SocketAddr, String),
    ) -> Result<Option<(AsyncStream, SocketAddr, WorkerMsg)>, LaunchError> {
        use futures_util::{FutureExt, StreamExt};
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                Some((peer, done)) = self.pending.next(), if !self.pending.is_empty() => match done {
                    Ok((stream, first)) => return Ok(Some((stream, peer, first))),
                    Err(reason) => on_refused(peer, reason),
                },
                accepted = self.listener.accept() => {
                    let (mut stream, peer) = accepted.map_err(|e| {
                        let addr = self.listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                        LaunchError::Rendezvous(format!("accept on {addr}: {e}"))
                    })?;
                    if self.pending.len() >= MAX_HANDSHAKES {
                        on_refused(peer, format!("{MAX_HANDSHAKES} other connections are in their handshake"));
                        continue;
                    }
                    let secret = self.secret.clone();
                    self.pending.push(
                        async move {
                            let handshake = async {
                                authenticate(&mut stream, &secret).await?;
                                protocol::recv_async::<WorkerMsg, _>(&mut stream).await
                            };
                            let done = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
                                Ok(Ok(first)) => Ok((stream, first)),
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(_) => Err("did not complete the handshake within 10 s".into()),
                            };
                            (peer, done)
                        }
                        .boxed(),
                    );
                }
            }
        }
    }
}

/// Another node's launcher, enlisted as its node agent: the root holds this connection for the whole launch.
pub struct Agent {
    pub enlist: Enlist,
    pub stream: AsyncStream,
}

/// How node 0 checks that another node writes into the checkpoint store it reads: `sees` looks for the
/// marker that node's launcher wrote (and removes it); `location` names the store in messages.
pub struct SharedStore<'a> {
    pub location: String,
    pub sees: &'a (dyn Fn(&str) -> Result<bool, String> + Sync),
}

/// Root side (node 0): before the first gang, accepts the launchers of nodes `1..nnodes` on `listener`,
/// each proving the run's secret and enlisting with the same ranks per node and config as this one, and
/// writing into the same checkpoint store.
///
/// # Errors
/// [`LaunchError::Rendezvous`] naming the nodes whose launcher never came within `timeout`;
/// [`LaunchError::Rejected`] naming a node that disagrees (nodes count, node rank, ranks per node, config),
/// which is told so before the launch stops.
pub async fn muster(
    listener: &tokio::net::TcpListener,
    secret: &[u8],
    me: &Enlist,
    timeout: Duration,
    store: &SharedStore<'_>,
    mut on_refused: impl FnMut(SocketAddr, String),
) -> Result<Vec<Agent>, LaunchError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut acceptor = Acceptor::new(listener, secret);
    let mut agents: Vec<Option<Agent>> = (0..me.nnodes).map(|_| None).collect();
    while agents.iter().skip(1).any(Option::is_none) {
        let Some((mut stream, peer, first)) = acceptor.next(deadline, &mut on_refused).await? else {
            let missing: Vec<usize> = (1..me.nnodes).filter(|&n| agents[n].is_none()).collect();
            let (addr, port) = listener.local_addr().map_or((String::new(), 0), |a| (a.to_string(), a.port()));
            return Err(LaunchError::Rendezvous(format!(
                "the launcher of node(s) {missing:?} never reached {addr} within {:.0} s (launch.rdzv_timeout_s): \
                 run `tessera launch --nnodes {} --node-rank K --rdzv HOST:{port}` on every node, with the same \
                 {} exported",
                timeout.as_secs_f64(),
                me.nnodes,
                super::launcher::RUN_SECRET_ENV,
            )));
        };
        let WorkerMsg::Enlist(e) = first else {
            on_refused(peer, format!("sent {first:?} before every node's launcher had enlisted"));
            continue;
        };
        let problem = if e.nnodes != me.nnodes {
            Some(format!("node {} was started with --nnodes {}, node 0 with {}", e.node_rank, e.nnodes, me.nnodes))
        } else if e.node_rank == 0 || e.node_rank >= me.nnodes {
            Some(format!("a launcher on {} says it is node {}, outside 1..{}", e.host, e.node_rank, me.nnodes))
        } else if agents[e.node_rank].is_some() {
            Some(format!("two launchers say they are node {} (the second from {peer})", e.node_rank))
        } else if e.nproc != me.nproc {
            Some(format!(
                "node {} runs {} rank(s), node 0 {}; every node must run the same --nproc",
                e.node_rank, e.nproc, me.nproc
            ))
        } else if e.config_hash != me.config_hash {
            Some(format!(
                "node {} and node 0 resolved different configs (hash {} vs {}); every node must run the same config \
                 and overrides",
                e.node_rank, e.config_hash, me.config_hash
            ))
        } else {
            shares_the_store(&e, store)
        };
        if let Some(reason) = problem {
            let stop =
                RootMsg::Stop { outcome: Err(Failed { code: 2, message: format!("the gang was rejected: {reason}") }) };
            let _ = protocol::send_async(&mut stream, &stop).await;
            for a in agents.iter_mut().flatten() {
                let _ = protocol::send_async(&mut a.stream, &stop).await;
            }
            return Err(LaunchError::Rejected(reason));
        }
        let node = e.node_rank;
        agents[node] = Some(Agent { enlist: e, stream });
    }
    Ok(agents.into_iter().flatten().collect())
}

/// Why node `e` does not share node 0's checkpoint store, if it does not.
fn shares_the_store(e: &Enlist, store: &SharedStore<'_>) -> Option<String> {
    let (node, at) = (e.node_rank, &store.location);
    match &e.store_marker {
        Err(why) => Some(format!("node {node} cannot write into the checkpoint store {at}: {why}")),
        Ok(marker) => match (store.sees)(marker) {
            Ok(true) => None,
            Ok(false) => Some(format!(
                "node {node} wrote {marker} into the checkpoint store {at}, but node 0 does not see it there: \
                 every node must share one checkpoint store, or no checkpoint can ever commit. Put checkpoint.dir \
                 on a file system every node mounts at the same path, or in object storage (s3://bucket/run)"
            )),
            Err(why) => Some(format!("node 0 cannot read the checkpoint store {at}: {why}")),
        },
    }
}

/// Accepts ranks on `listener` until all `world` have joined and agree, or `timeout` passes.
///
/// Connections that fail authentication are dropped and reported through `on_refused` (they do not count
/// and cannot disturb the gang).
///
/// # Errors
/// [`LaunchError::NeverJoined`] naming the ranks that never joined, [`LaunchError::Rendezvous`] if the
/// listener fails, or [`LaunchError::Rejected`] naming those whose world size, rank or config disagree.
pub async fn serve(
    listener: &tokio::net::TcpListener,
    secret: &[u8],
    world: usize,
    timeout: Duration,
    start: &crate::launch::protocol::StartSpec,
    mut on_refused: impl FnMut(SocketAddr, String),
) -> Result<Vec<Member>, LaunchError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut members: Vec<Option<Member>> = (0..world).map(|_| None).collect();
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut acceptor = Acceptor::new(listener, secret);
    while members.iter().any(Option::is_none) {
        let Some((mut stream, peer, first)) = acceptor.next(deadline, &mut on_refused).await? else {
            let missing: Vec<usize> = (0..world).filter(|&r| members[r].is_none()).collect();
            return Err(LaunchError::NeverJoined {
                ranks: missing,
                addr: addr.to_string(),
                timeout_s: timeout.as_secs_f64(),
            });
        };
        let WorkerMsg::Join(join) = first else {
            on_refused(peer, format!("sent {first:?} instead of joining"));
            continue;
        };
        let problem = if join.world != world {
            Some(format!("rank {} expects a world of {}, the launcher {world}", join.rank, join.world))
        } else if join.rank >= world {
            Some(format!("rank {} is outside a world of {world}", join.rank))
        } else if members[join.rank].is_some() {
            Some(format!("rank {} joined twice (from {peer})", join.rank))
        } else {
            members.iter().flatten().find(|m| m.join.config_hash != join.config_hash).map(|m| {
                format!(
                    "rank {} and rank {} resolved different configs (hash {} vs {}); every rank must run the same \
                     config and overrides",
                    m.join.rank, join.rank, m.join.config_hash, join.config_hash
                )
            })
        };
        if let Some(reason) = problem {
            let msg = LauncherMsg::Reject { reason: reason.clone() };
            let _ = protocol::send_async(&mut stream, &msg).await;
            for m in members.iter_mut().flatten() {
                let _ = protocol::send_async(&mut m.stream, &msg).await;
            }
            return Err(LaunchError::Rejected(reason));
        }
        let rank = join.rank;
        members[rank] = Some(Member { join, stream, peer });
    }
    let mut members: Vec<Member> = members.into_iter().map(|m| m.expect("all joined")).collect();
    let comm_addrs: Vec<SocketAddr> = members.iter().map(reachable_comm_addr).collect();
    for m in &mut members {
        protocol::send_async(
            &mut m.stream,
            &LauncherMsg::Peers { comm_addrs: comm_addrs.clone(), start: start.clone() },
        )
        .await
        .map_err(|e| LaunchError::Rendezvous(format!("rank {} left during the rendezvous: {e}", m.join.rank)))?;
    }
    Ok(members)
}

/// Where the other ranks reach member `m`'s communicator: the address it listens on, or, when it listens
/// on every interface (`launch.bind = "0.0.0.0"`), the address this rendezvous sees it from (its node's
/// address on the network that reaches node 0).
fn reachable_comm_addr(m: &Member) -> SocketAddr {
    let a = m.join.comm_addr;
    if a.ip().is_unspecified() {
        SocketAddr::new(m.peer.ip(), a.port())
    } else {
        a
    }
}

/// Worker side: connects to the rendezvous at `addr` (retrying until `timeout`), authenticates, joins, and
/// waits for the peer list. Returns the control connection, every rank's communicator address, and how the
/// gang starts.
///
/// `launcher`: the pid of the launcher that started this worker (its parent). Should it go away while the
/// rendezvous is not yet reachable (killed as its workers start), the worker stops trying at once: an orphan that kept
/// trying would hold its memory (and GPU) for `timeout`, and could join the next launch at the same address.
///
/// # Errors
/// [`LaunchError::Rendezvous`] if the rendezvous cannot be reached or stops answering in time, or refuses the
/// secret, or the launcher is gone; [`LaunchError::Rejected`] if it rejects the gang.
pub fn join(
    addr: SocketAddr,
    secret: &[u8],
    me: Join,
    timeout: Duration,
    launcher: Option<u32>,
) -> Result<(TcpStream, Vec<SocketAddr>, crate::launch::protocol::StartSpec), LaunchError> {
    let mut stream = dial(addr, secret, WorkerMsg::Join(me), timeout, launcher)?;
    let reply: LauncherMsg =
        protocol::recv(&mut stream).map_err(|e| io_error(addr, "waiting for the other ranks", e))?;
    stream.set_read_timeout(None).ok();
    match reply {
        LauncherMsg::Peers { comm_addrs, start } => Ok((stream, comm_addrs, start)),
        LauncherMsg::Reject { reason } => Err(LaunchError::Rejected(reason)),
        LauncherMsg::Abort { reason } => Err(LaunchError::Rejected(format!("aborted during the rendezvous: {reason}"))),
        LauncherMsg::Preempt => Err(LaunchError::Rejected("preempted during the rendezvous".into())),
        LauncherMsg::Reset { .. } => Err(LaunchError::Rejected("reset during the rendezvous".into())),
    }
}

/// Connects to the rendezvous at `addr` (retrying until `timeout`, or until this process's parent is no
/// longer `parent`), authenticates and sends `first`. The stream's read timeout is what is left of `timeout`.
fn dial(
    addr: SocketAddr,
    secret: &[u8],
    first: WorkerMsg,
    timeout: Duration,
    parent: Option<u32>,
) -> Result<TcpStream, LaunchError> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        if parent.is_some_and(|p| std::os::unix::process::parent_id() != p) {
            return Err(LaunchError::Rendezvous(format!(
                "the launcher that started this worker is gone (it never opened the rendezvous at {addr}); \
                 stopping"
            )));
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(LaunchError::Rendezvous(format!(
                    "cannot reach the rendezvous at {addr} within {timeout:?}: {e}; is the launcher running, and \
                     is --rdzv right?"
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    stream.set_read_timeout(Some(remaining)).ok();
    crate::comm::auth::respond(&mut stream, secret, RDZV_LABEL).map_err(|e| io_error(addr, "authentication", e))?;
    protocol::send(&mut stream, &first).map_err(|e| io_error(addr, "join", e))?;
    Ok(stream)
}

fn io_error(addr: SocketAddr, what: &str, e: std::io::Error) -> LaunchError {
    let hint = match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            " (the launcher closed the connection: it is stopping, or this process has another run secret)"
        }
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => " (timed out)",
        _ => "",
    };
    LaunchError::Rendezvous(format!("rendezvous at {addr}: {what}: {e}{hint}"))
}

/// Node agent side (nodes 1, 2, ...): enlists this node's launcher with node 0's at `addr`. The returned
/// connection has no read timeout: node 0 says when the first gang forms ([`RootMsg::Gang`]), once every node
/// has enlisted.
///
/// # Errors
/// As [`join`].
pub fn enlist(addr: SocketAddr, secret: &[u8], me: Enlist, timeout: Duration) -> Result<TcpStream, LaunchError> {
    let stream = dial(addr, secret, WorkerMsg::Enlist(me), timeout, None)?;
    stream.set_read_timeout(None).ok();
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join_msg(rank: usize, hash: &str) -> Join {
        Join {
            rank,
            world: 2,
            config_hash: hash.into(),
            comm_addr: "127.0.0.1:1".parse().unwrap(),
            host: "test".into(),
            pid: 1,
            device: "cpu".into(),
        }
    }

    type Joined = Result<(TcpStream, Vec<SocketAddr>, crate::launch::protocol::StartSpec), LaunchError>;

    /// Serves a rendezvous for two ranks and runs `clients` against it: what the server, each client, and the
    /// refusal callback saw.
    fn with_server(
        secret: &'static str,
        clients: Vec<(&'static str, Join)>,
    ) -> (Result<Vec<Member>, LaunchError>, Vec<Joined>, Vec<String>) {
        with_server_and_silent_peers(secret, clients, 0)
    }

    /// [`with_server`], with `silent` connections opened first that never say anything (held open throughout).
    fn with_server_and_silent_peers(
        secret: &'static str,
        clients: Vec<(&'static str, Join)>,
        silent: usize,
    ) -> (Result<Vec<Member>, LaunchError>, Vec<Joined>, Vec<String>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let _quiet: Vec<TcpStream> = (0..silent).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let threads: Vec<_> = clients
            .into_iter()
            .map(|(s, j)| std::thread::spawn(move || join(addr, s.as_bytes(), j, Duration::from_secs(5), None)))
            .collect();
        let mut refused = vec![];
        let start = crate::launch::protocol::StartSpec { resume: "auto".into(), rollback: None, attempt: 1 };
        let served = rt.block_on(serve(&listener, secret.as_bytes(), 2, Duration::from_secs(3), &start, |_, why| {
            refused.push(why)
        }));
        let joined = threads.into_iter().map(|t| t.join().unwrap()).collect();
        (served, joined, refused)
    }

    #[test]
    fn two_ranks_with_the_secret_and_one_config_form_a_gang() {
        let (served, joined, _) = with_server("s", vec![("s", join_msg(0, "h")), ("s", join_msg(1, "h"))]);
        assert_eq!(served.unwrap().len(), 2);
        for j in joined {
            let (_, peers, start) = j.unwrap();
            assert_eq!((peers.len(), start.resume.as_str()), (2, "auto"), "the peers and how to start");
        }
    }

    #[test]
    fn peers_that_connect_and_say_nothing_do_not_hold_up_the_ranks_behind_them() {
        // Each silent peer holds its handshake for 10 s, past the rendezvous's 3 s: one at a time, the ranks
        // would never be heard in time.
        let clients = vec![("s", join_msg(0, "h")), ("s", join_msg(1, "h"))];
        let (served, joined, _) = with_server_and_silent_peers("s", clients, 20);
        assert_eq!(served.expect("the gang formed").len(), 2);
        assert!(joined.iter().all(Result::is_ok));
    }

    #[test]
    fn a_rank_listening_on_every_interface_is_reached_at_the_address_it_joined_from() {
        let mut anywhere = join_msg(1, "h");
        anywhere.comm_addr = "0.0.0.0:4321".parse().unwrap();
        let (served, joined, _) = with_server("s", vec![("s", join_msg(0, "h")), ("s", anywhere)]);
        assert_eq!(served.unwrap().len(), 2);
        for j in joined {
            let (_, peers, _) = j.unwrap();
            assert_eq!(peers, ["127.0.0.1:1".parse().unwrap(), "127.0.0.1:4321".parse().unwrap()]);
        }
    }

    #[test]
    fn a_wrong_secret_is_refused_and_the_gang_never_forms_with_it() {
        let (served, joined, refused) = with_server("s", vec![("s", join_msg(0, "h")), ("wrong", join_msg(1, "h"))]);
        assert!(refused.iter().any(|r| r.contains("wrong run secret")), "{refused:?}");
        let err = served.err().expect("rank 1 never joined").to_string();
        assert!(err.contains("[1] never joined"), "{err}");
        let client = joined[1].as_ref().expect_err("refused").to_string();
        assert!(client.contains("another run secret"), "{client}");
    }

    #[test]
    fn two_launchers_claiming_the_same_node_are_refused_and_told_why() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let node = |n: usize| Enlist {
            node_rank: n,
            nnodes: 3,
            nproc: 2,
            config_hash: "h".into(),
            host: "test".into(),
            store_marker: Ok(format!("m{n}")),
        };
        let agents: Vec<_> = [node(1), node(1)]
            .into_iter()
            .map(|e| {
                std::thread::spawn(move || {
                    let mut s = enlist(addr, b"s", e, Duration::from_secs(5)).unwrap();
                    protocol::recv::<RootMsg, _>(&mut s)
                })
            })
            .collect();
        let store = SharedStore { location: "test".into(), sees: &|_| Ok(true) };
        let mustered = rt.block_on(muster(&listener, b"s", &node(0), Duration::from_secs(5), &store, |_, _| {}));
        let err = mustered.err().expect("refused").to_string();
        assert!(err.contains("two launchers say they are node 1"), "{err}");
        for a in agents {
            match a.join().unwrap() {
                Ok(RootMsg::Stop { outcome: Err(f) }) => assert_eq!(f.code, 2, "{f:?}"),
                other => panic!("each launcher is told to stop: {other:?}"),
            }
        }
    }

    #[test]
    fn ranks_with_different_configs_are_rejected_naming_both() {
        let (served, joined, _) = with_server("s", vec![("s", join_msg(0, "aaaa")), ("s", join_msg(1, "bbbb"))]);
        let err = served.err().expect("rejected").to_string();
        assert!(err.contains("rank 0") && err.contains("rank 1") && err.contains("different configs"), "{err}");
        for j in joined {
            assert!(matches!(j, Err(LaunchError::Rejected(_))), "every rank is told");
        }
    }
}
