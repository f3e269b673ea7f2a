//! `tessera launch`: validates the config once, forms the rendezvous, and runs the supervisor until the run
//! ends. On nodes other than 0 it enlists with node 0's launcher and runs the node agent instead.

use super::events::EventLog;
use super::protocol::Enlist;
use super::{rendezvous, LaunchError};
use crate::actors::gang::GangReport;
use crate::actors::node_agent::{NodeAgent, NodeAgentArgs, NodeAgentMsg, NodeSpec};
use crate::actors::policy::RestartPolicy;
use crate::actors::rank_process::NodeRanks;
use crate::actors::supervisor::{Supervisor, SupervisorArgs};
use crate::config::{ConfigError, DeviceSpec, RunConfig, MAX_PER_NODE};
use crate::error::{Error, Result};
use ractor::Actor;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable holding the run secret that every node of a multi-node run must share.
pub const RUN_SECRET_ENV: &str = "TESSERA_RUN_SECRET";

/// What `tessera launch` was asked.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub config: PathBuf,
    pub overrides: Vec<String>,
    /// Processes on this node; default `launch.nproc` from the config.
    pub nproc: Option<usize>,
    pub nnodes: usize,
    pub node_rank: usize,
    /// Rendezvous `host:port` (node 0 listens there, the others connect). Default: loopback, any port
    /// (single node only).
    pub rdzv: Option<String>,
    /// Where to serve Prometheus metrics (`host:port`); default [`DEFAULT_METRICS_ADDR`], or any free port on
    /// loopback if that one is taken.
    pub metrics_addr: Option<String>,
}

/// The default metrics address: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// What the arguments and config came to, once checked.
struct Checked {
    nproc: usize,
    world: usize,
    secret: String,
    /// `--rdzv`, resolved (where given and resolvable).
    rdzv: Option<std::net::SocketAddr>,
}

/// Runs a gang to completion: node 0 supervises the run, any other node runs its ranks on node 0's word.
/// Returns how it ended and the resolved config it ran (for the summary: where its checkpoints are).
///
/// # Errors
/// Config, data and device errors before anything starts; launch errors naming the failed rank.
pub fn launch(opts: &LaunchOptions) -> Result<(GangReport, RunConfig)> {
    let cfg = crate::config::load_resolved(&opts.config, &opts.overrides)?;
    let Checked { nproc, world, secret, rdzv: rdzv_resolved } = check(opts, &cfg)?;
    let rdzv_timeout = Duration::from_secs_f64(cfg.launch.rdzv_timeout_s);
    let hang_timeout = (cfg.launch.hang_timeout_s > 0.0).then(|| Duration::from_secs_f64(cfg.launch.hang_timeout_s));
    let mut worker_args: Vec<OsString> = vec!["worker".into(), "--config".into(), opts.config.clone().into()];
    for o in &opts.overrides {
        worker_args.push("--set".into());
        worker_args.push(o.into());
    }
    let exe = std::env::current_exe().map_err(|e| setup(format!("cannot find the tessera binary: {e}")))?;
    let ranks = NodeRanks { exe, worker_args, world, first_rank: opts.node_rank * nproc, nproc, secret };
    let store = crate::ckpt::store::CkptStore::open(&cfg.checkpoint.dir, &cfg.checkpoint.storage_options);
    // Another node proves that it writes where node 0 reads: a marker in the checkpoint store.
    let store_marker = match (&store, opts.node_rank) {
        (_, 0) => Ok(String::new()),
        (Ok(s), k) => {
            let name = format!(".tessera-node-{k}-{}", &crate::comm::auth::new_secret()[..16]);
            s.put_marker(&name).map(|()| name).map_err(|e| e.to_string())
        }
        (Err(e), _) => Err(e.to_string()),
    };
    let me = Enlist {
        node_rank: opts.node_rank,
        nnodes: opts.nnodes,
        nproc,
        config_hash: crate::launch::worker::gang_hash(&cfg),
        host: crate::launch::worker::hostname(),
        store_marker,
    };
    let store = store.ok().map(std::sync::Arc::new);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| setup(format!("cannot start the actor runtime: {e}")))?;
    let ended = rt.block_on(async {
        if opts.node_rank > 0 {
            let want = opts.rdzv.as_deref().unwrap_or_default();
            let rdzv = rdzv_resolved.ok_or_else(|| arg("--rdzv", format!("{want} does not resolve to an address")))?;
            let node = NodeSpec {
                ranks,
                rdzv,
                node_rank: opts.node_rank,
                silence: crate::actors::policy::node_silence(hang_timeout),
                rdzv_timeout,
            };
            let marker = me.store_marker.clone().ok();
            let ended = run_node_agent(node, me, rdzv_timeout).await;
            // Node 0 removes the marker once it has seen it; after a refusal it is still there.
            if let (Some(s), Some(m)) = (&store, marker) {
                let _ = s.remove_marker(&m);
            }
            return ended;
        }
        // The run directory is node 0's until the run ends (a second launch on it is refused).
        let _lock = crate::run_lock::RunLock::acquire(&cfg.run_dir)?;
        let want = opts.rdzv.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let listener = tokio::net::TcpListener::bind(&want)
            .await
            .map_err(|e| arg("--rdzv", format!("cannot listen for the rendezvous on {want}: {e}")))?;
        let node0 = Node0 { opts, cfg: &cfg, ranks, me, store, rdzv_timeout, hang_timeout };
        node0.run(listener).await
    });
    // A look at a silent store may still be waiting for its answer on a blocking thread (the supervisor gave
    // up on it): the launch is over, so it is not waited for beyond a moment.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    ended.map(|report| (report, cfg))
}

fn setup(m: String) -> Error {
    Error::Launch(LaunchError::Setup(m))
}

fn arg(flag: &str, reason: String) -> Error {
    Error::Config(ConfigError::Arg { flag: flag.into(), reason })
}

/// Checks the arguments against each other and the config before anything starts: sizes, the GPU count, the
/// batch over the world, the run secret and rendezvous address of a multi-node run, and the listen address.
fn check(opts: &LaunchOptions, cfg: &RunConfig) -> Result<Checked> {
    let nproc = opts.nproc.unwrap_or(cfg.launch.nproc);
    if nproc == 0 || nproc > MAX_PER_NODE {
        return Err(arg("--nproc", format!("{nproc} must be between 1 and {MAX_PER_NODE} rank processes per node")));
    }
    if opts.nnodes == 0 || opts.nnodes > 65_536 {
        return Err(arg("--nnodes", format!("{} must be between 1 and 65536", opts.nnodes)));
    }
    if opts.node_rank >= opts.nnodes {
        return Err(arg("--node-rank", format!("{} must be below --nnodes {}", opts.node_rank, opts.nnodes)));
    }
    if let DeviceSpec::Cuda(_) = cfg.device {
        crate::device::resolve(DeviceSpec::Cuda(0))?;
        let count = tch::Cuda::device_count() as usize;
        if nproc > count {
            return Err(arg(
                "--nproc",
                format!(
                    "{nproc} is larger than the {count} CUDA device(s) on this node: one rank per GPU (NCCL refuses \
                     two ranks on one GPU)"
                ),
            ));
        }
    }
    let world = opts.nnodes * nproc;
    // Before any process starts: a batch that cannot divide over the ranks fails here, once.
    cfg.check_world(world as u64)?;
    let secret = match std::env::var(RUN_SECRET_ENV) {
        Ok(s) if !s.is_empty() => s,
        _ if opts.nnodes > 1 => {
            return Err(arg(
                "--nnodes",
                format!(
                    "a multi-node run needs the same secret on every node: export {RUN_SECRET_ENV}=<random hex> on \
                     all of them"
                ),
            ))
        }
        _ => crate::comm::auth::new_secret(),
    };
    if opts.nnodes > 1 && opts.rdzv.is_none() {
        return Err(arg(
            "--rdzv",
            "a multi-node run needs HOST:PORT (node 0's address, reachable from every node)".into(),
        ));
    }
    // Resolved once: for the checks below, and as the address another node's launcher reaches node 0 at.
    let rdzv = opts.rdzv.as_deref().and_then(|r| std::net::ToSocketAddrs::to_socket_addrs(r).ok()?.next());
    // (Not under `tessera chaos`, whose simulated nodes all run here.)
    if opts.nnodes > 1
        && opts.node_rank == 0
        && rdzv.is_some_and(|a| a.ip().is_loopback())
        && !crate::chaos::under_harness()
    {
        crate::say!(
            "tessera launch: warning: --rdzv {} is a loopback address here, which only launchers on this machine can \
             reach (a host name mapped to 127.0.1.1 in /etc/hosts does this); give node 0's network address or \
             0.0.0.0:PORT unless every node runs on this machine",
            opts.rdzv.as_deref().unwrap_or_default()
        );
    }
    // Ranks on loopback cannot be reached from other machines (nodes on one machine, as in tests, can).
    let bind_is_loopback = cfg.launch.bind.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if opts.nnodes > 1 && bind_is_loopback && rdzv.is_some_and(|a| !a.ip().is_loopback()) {
        return Err(Error::Config(ConfigError::Invalid {
            key: "launch.bind".into(),
            reason: format!(
                "{} is loopback, so the ranks of other nodes cannot reach this node's: set launch.bind = \"0.0.0.0\" \
                 (each rank is then reached at the address node 0's rendezvous sees it from)",
                cfg.launch.bind
            ),
        }));
    }
    Ok(Checked { nproc, world, secret, rdzv })
}

/// Node 0's part: muster the other nodes, serve metrics, run the supervisor until the run ends.
struct Node0<'a> {
    opts: &'a LaunchOptions,
    cfg: &'a RunConfig,
    ranks: NodeRanks,
    me: Enlist,
    store: Option<std::sync::Arc<crate::ckpt::store::CkptStore>>,
    rdzv_timeout: Duration,
    hang_timeout: Option<Duration>,
}

impl Node0<'_> {
    async fn run(self, listener: tokio::net::TcpListener) -> Result<GangReport> {
        let Node0 { opts, cfg, ranks, me, store, rdzv_timeout, hang_timeout } = self;
        let rdzv_addr = listener.local_addr().map_err(|e| setup(e.to_string()))?;
        // Every other node's launcher enlists before the first gang starts.
        let nodes = if opts.nnodes > 1 {
            crate::say!(
                "tessera launch: node 0 of {}: waiting at {rdzv_addr} for the other nodes' launchers",
                opts.nnodes
            );
            let sees = |marker: &str| match &store {
                Some(s) => {
                    let seen = s.has_marker(marker).map_err(|e| e.to_string())?;
                    let _ = s.remove_marker(marker);
                    Ok(seen)
                }
                None => Err("it does not open".to_string()),
            };
            let shared = rendezvous::SharedStore { location: cfg.checkpoint.dir.clone(), sees: &sees };
            rendezvous::muster(&listener, ranks.secret.as_bytes(), &me, rdzv_timeout, &shared, |peer, why| {
                crate::say!("tessera launch: refused a connection from {peer}: {why}")
            })
            .await?
        } else {
            vec![]
        };
        let metrics = serve_metrics(opts).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let args = SupervisorArgs {
            ranks,
            rdzv: Some(listener),
            rdzv_addr,
            rdzv_timeout,
            hang_timeout,
            policy: RestartPolicy {
                max_restarts: cfg.launch.max_restarts,
                window: Duration::from_secs_f64(cfg.launch.restart_window_s),
            },
            nodes,
            events: EventLog::new(&cfg.run_dir),
            store,
            metrics: Some(metrics),
            cfg: cfg.clone(),
            outcome: tx,
        };
        let (sup, handle) = Actor::spawn(None, Supervisor, args)
            .await
            .map_err(|e| setup(format!("cannot start the supervisor: {e}")))?;
        on_preemption(move || {
            let _ = sup.cast(crate::actors::supervisor::SupervisorMsg::Preempt);
        });
        let outcome =
            rx.await.unwrap_or_else(|_| Err(LaunchError::Setup("the supervisor stopped without a result".into())));
        let _ = handle.await;
        // The picture of the run, whatever its outcome.
        if let Ok(path) = crate::plot::write_loss_svg(&cfg.run_dir) {
            crate::say!("tessera launch: loss curve with faults and rollbacks: {}", path.display());
        }
        outcome.map_err(Error::from)
    }
}

/// Serves the Prometheus endpoint at `--metrics-addr`: the default address falls back to a free port (with
/// a warning if even that fails), one the user named does not.
async fn serve_metrics(opts: &LaunchOptions) -> Result<crate::actors::metrics_exporter::Metrics> {
    let metrics = crate::actors::metrics_exporter::Metrics::default();
    let want = opts.metrics_addr.clone().unwrap_or_else(|| DEFAULT_METRICS_ADDR.into());
    match crate::actors::metrics_exporter::serve(metrics.clone(), &want, opts.metrics_addr.is_none()).await {
        Ok(addr) => crate::say!("tessera launch: Prometheus metrics at http://{addr}/metrics"),
        Err(e) if opts.metrics_addr.is_some() => {
            return Err(Error::Config(ConfigError::Arg {
                flag: format!("--metrics-addr {want}"),
                reason: format!("cannot listen there ({e}); give a free HOST:PORT of this machine, or leave it out"),
            }))
        }
        Err(e) => crate::say!("tessera launch: warning: no metrics endpoint: cannot listen on {want}: {e}"),
    }
    Ok(metrics)
}

/// Preemption of a launch: every rank checkpoints a common step and stops; a second signal stops at once.
fn on_preemption(preempt: impl Fn() + Send + 'static) {
    crate::on_preemption_signals("tessera launch", "checkpointing a common step and stopping", preempt);
}

/// Nodes 1, 2, ...: enlists with node 0's launcher and runs this node's ranks on its word until it says the
/// launch is over.
async fn run_node_agent(node: NodeSpec, me: Enlist, timeout: Duration) -> Result<GangReport> {
    let (addr, secret, node_rank) = (node.rdzv, node.ranks.secret.clone(), me.node_rank);
    crate::say!("tessera launch: node {node_rank}: enlisting with node 0's launcher at {addr}");
    let stream = tokio::task::spawn_blocking(move || rendezvous::enlist(addr, secret.as_bytes(), me, timeout))
        .await
        .map_err(|e| setup(e.to_string()))??;
    stream.set_nonblocking(true).map_err(|e| setup(e.to_string()))?;
    let root = tokio::net::TcpStream::from_std(stream).map_err(|e| setup(e.to_string()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (agent, handle) = Actor::spawn(None, NodeAgent, NodeAgentArgs { node, root, outcome: tx })
        .await
        .map_err(|e| setup(format!("cannot start the node agent: {e}")))?;
    on_preemption(move || {
        let _ = agent.cast(NodeAgentMsg::Preempt);
    });
    let outcome =
        rx.await.unwrap_or_else(|_| Err(LaunchError::Setup("the node agent stopped without a result".into())));
    let _ = handle.await;
    let f = outcome?;
    Ok(GangReport { steps: f.steps, final_loss: f.final_loss, preempted: f.preempted })
}
