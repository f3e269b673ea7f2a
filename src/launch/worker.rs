//! `tessera worker`: one rank process of a launched gang.
//!
//! The worker reads how to find its gang from the environment ([`WorkerEnv`]), resolves the same config as
//! every other rank, binds its communicator's listener, joins the rendezvous, and hands over to its rank actor
//! ([`crate::actors::rank`]), which trains on a dedicated thread and talks to the launcher. When another rank
//! fails, the launcher resets this one in place: the attempt ends, and the same process (libtorch and its
//! CUDA context loaded) joins the next gang's rendezvous, where the peer list says how to resume.

use super::protocol::Join;
use super::{rendezvous, LaunchError, WorkerEnv};
use crate::error::{Error, Result};
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

/// Runs this worker to the end of training.
///
/// # Errors
/// Config, data or device errors (reported before joining, so the launcher sees the worker fail to start);
/// rendezvous errors; training errors.
pub fn run(config: &Path, overrides: &[String]) -> Result<()> {
    let env = WorkerEnv::from_env()?;
    // The launcher coordinates preemption: a terminal's Ctrl-C or a scheduler's SIGTERM sent to the whole
    // process group must not kill ranks under it (a worker whose launcher is gone exits by itself).
    // SAFETY: installing SIG_IGN for two signals has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    for point in ["worker.start".to_string(), format!("worker.start.rank{}", env.rank)] {
        crate::chaos::failpoint(&point).map_err(|e| LaunchError::Setup(format!("rank {}: {e}", env.rank)))?;
    }
    let mut cfg = crate::config::load_resolved(config, overrides)?;
    let hash = gang_hash(&cfg);
    // Each rank of a node drives its own GPU.
    if let crate::config::DeviceSpec::Cuda(_) = cfg.device {
        cfg.device = crate::config::DeviceSpec::Cuda(env.local_rank);
    }
    let timeout = Duration::from_secs_f64(cfg.launch.rdzv_timeout_s);
    let mut rdzv = env.rdzv;
    loop {
        let bind = format!("{}:0", cfg.launch.bind);
        let listener =
            TcpListener::bind(&bind).map_err(|e| LaunchError::Setup(format!("cannot listen on {bind}: {e}")))?;
        let me = Join {
            rank: env.rank,
            world: env.world,
            config_hash: hash.clone(),
            comm_addr: listener.local_addr().map_err(|e| LaunchError::Setup(e.to_string()))?,
            host: hostname(),
            pid: std::process::id(),
            device: match cfg.device {
                crate::config::DeviceSpec::Cuda(i) => format!("cuda:{i}"),
                _ => "cpu".into(),
            },
        };
        let (control, peers, start) = rendezvous::join(rdzv, env.secret.as_bytes(), me, timeout, env.launcher)?;
        let mut attempt = cfg.clone();
        (attempt.resume, attempt.rollback, attempt.attempt) = (start.resume, start.rollback, start.attempt);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::Launch(LaunchError::Setup(format!("cannot start the actor runtime: {e}"))))?;
        let args = crate::actors::rank::RankArgs { cfg: attempt, env: env.clone(), control, listener, peers };
        match rt.block_on(crate::actors::rank::run(args))? {
            crate::actors::rank::Outcome::Done => return Ok(()),
            crate::actors::rank::Outcome::Reset(next) => {
                crate::say!("tessera worker: rank {}: reset in place; joining the next gang at {next}", env.rank);
                rdzv = next;
            }
        }
    }
}

/// The hash ranks (and nodes) must agree on: the resolved config's, but for where to resume from, which
/// the gang's peer list says.
pub fn gang_hash(cfg: &crate::config::RunConfig) -> String {
    let mut c = cfg.clone();
    c.resume = String::new();
    c.hash()
}

/// This machine's name, for reports.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
