//! The metrics exporter: the launcher's Prometheus endpoint (`GET /metrics` on `--metrics-addr`, loopback by
//! default), served from the [`Metrics`] the supervisor and gang update, in the text exposition format
//! written by `prometheus-client` (the Prometheus project's own crate).
//!
//! Failure meaning: a connection that misbehaves is dropped; an accept that fails (out of file descriptors,
//! say) is retried after a pause, so the endpoint comes back when the cause goes away and never spins.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type FGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RankLabel {
    pub rank: String,
}

/// Everything the launcher exports. Cheap to clone (every metric is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub step: FGauge,
    pub loss: FGauge,
    pub learning_rate: FGauge,
    pub tokens_per_second: FGauge,
    pub mfu: FGauge,
    pub grad_norm: FGauge,
    pub micro_batch: FGauge,
    pub data_wait_seconds: Histogram,
    pub step_seconds: Histogram,
    pub checkpoint_stall_seconds: Histogram,
    pub checkpoint_commit_seconds: Histogram,
    pub checkpoints_committed: Counter,
    pub checkpoints_abandoned: Counter,
    pub checkpoint_bytes: FGauge,
    pub checkpoint_bytes_total: Counter,
    pub restarts: Family<ReasonLabel, Counter>,
    pub rollbacks: Family<ReasonLabel, Counter>,
    pub detect_seconds: Histogram,
    pub recover_seconds: Histogram,
    pub lost_steps: Counter,
    pub heartbeat_age_seconds: Family<RankLabel, FGauge>,
    /// Unix time of the last word from each other node's launcher (node 0's view; every second while it lives).
    pub node_last_heard_timestamp_seconds: Family<NodeLabel, FGauge>,
    pub goodput_ratio: FGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("tessera");
        let secs = || Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            step: FGauge::default(),
            loss: FGauge::default(),
            learning_rate: FGauge::default(),
            tokens_per_second: FGauge::default(),
            mfu: FGauge::default(),
            grad_norm: FGauge::default(),
            micro_batch: FGauge::default(),
            data_wait_seconds: secs(),
            step_seconds: secs(),
            checkpoint_stall_seconds: secs(),
            checkpoint_commit_seconds: secs(),
            checkpoints_committed: Counter::default(),
            checkpoints_abandoned: Counter::default(),
            checkpoint_bytes: FGauge::default(),
            checkpoint_bytes_total: Counter::default(),
            restarts: Family::default(),
            rollbacks: Family::default(),
            detect_seconds: secs(),
            recover_seconds: secs(),
            lost_steps: Counter::default(),
            heartbeat_age_seconds: Family::default(),
            node_last_heard_timestamp_seconds: Family::default(),
            goodput_ratio: FGauge::default(),
        };
        r.register("step", "Optimizer steps completed (rank 0)", m.step.clone());
        r.register("loss", "Training loss of the last logged step", m.loss.clone());
        r.register("learning_rate", "Learning rate of the last logged step", m.learning_rate.clone());
        r.register("tokens_per_second", "Training throughput over the last logged window", m.tokens_per_second.clone());
        r.register("mfu", "Model FLOPs utilisation (CUDA only; 0 on CPU)", m.mfu.clone());
        r.register("grad_norm", "Global gradient norm before clipping", m.grad_norm.clone());
        r.register(
            "micro_batch",
            "Samples per forward/backward on each rank (halved on out of memory with micro_batch = \"auto\")",
            m.micro_batch.clone(),
        );
        r.register("data_wait_seconds", "Time per step spent waiting for data", m.data_wait_seconds.clone());
        r.register("step_seconds", "Wall time per optimizer step (rank 0)", m.step_seconds.clone());
        r.register(
            "checkpoint_stall_seconds",
            "Time the step loop was blocked per checkpoint",
            m.checkpoint_stall_seconds.clone(),
        );
        r.register(
            "checkpoint_commit_seconds",
            "Hand-off to commit per checkpoint (write duration)",
            m.checkpoint_commit_seconds.clone(),
        );
        r.register("checkpoints_committed", "Checkpoints committed", m.checkpoints_committed.clone());
        r.register(
            "checkpoints_abandoned",
            "Checkpoints abandoned (a rank failed to write)",
            m.checkpoints_abandoned.clone(),
        );
        r.register(
            "checkpoint_bytes",
            "Size of the newest committed checkpoint, all ranks' files",
            m.checkpoint_bytes.clone(),
        );
        r.register("checkpoint_written_bytes", "Bytes of all checkpoints committed", m.checkpoint_bytes_total.clone());
        r.register("restarts", "Gang restarts, by the fault that caused them", m.restarts.clone());
        r.register("rollbacks", "Rollbacks to a checkpoint, by reason", m.rollbacks.clone());
        r.register(
            "detect_seconds",
            "Fault to detection (hangs: last heartbeat to detection)",
            m.detect_seconds.clone(),
        );
        r.register(
            "recover_seconds",
            "Detection to the first completed step after recovery",
            m.recover_seconds.clone(),
        );
        r.register("lost_steps", "Steps done and then lost to rollbacks", m.lost_steps.clone());
        r.register(
            "heartbeat_age_seconds",
            "Seconds since each rank's last heartbeat",
            m.heartbeat_age_seconds.clone(),
        );
        r.register(
            "node_last_heard_timestamp_seconds",
            "Unix time of the last word from each other node's launcher (a heartbeat every second)",
            m.node_last_heard_timestamp_seconds.clone(),
        );
        r.register("goodput_ratio", "Useful training time / wall time since launch", m.goodput_ratio.clone());
        Metrics { registry: Arc::new(r), ..m }
    }
}

impl Metrics {
    /// Updates the training and checkpoint metrics from rank 0's report of a logged step or a checkpoint
    /// event (other messages are not about training progress and change nothing here).
    pub fn record(&self, msg: &crate::launch::protocol::WorkerMsg) {
        use crate::launch::protocol::WorkerMsg;
        match msg {
            WorkerMsg::Progress { step, loss, tokens_per_s, lr, grad_norm, mfu, data_wait_ms, micro_batch } => {
                self.step.set(*step as f64);
                self.loss.set(*loss);
                self.tokens_per_second.set(*tokens_per_s);
                self.learning_rate.set(*lr);
                self.grad_norm.set(*grad_norm);
                self.mfu.set(*mfu);
                self.micro_batch.set(*micro_batch as f64);
                self.data_wait_seconds.observe(data_wait_ms / 1e3);
            }
            WorkerMsg::Checkpoint { what, stall_s, commit_s, bytes, .. } => match what.as_str() {
                "saved" => self.checkpoint_stall_seconds.observe(*stall_s),
                "committed" => {
                    self.checkpoints_committed.inc();
                    self.checkpoint_commit_seconds.observe(*commit_s);
                    self.checkpoint_bytes.set(*bytes as f64);
                    self.checkpoint_bytes_total.inc_by(*bytes);
                }
                "abandoned" => {
                    self.checkpoints_abandoned.inc();
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub struct MetricsExporter;

/// Serves `metrics` at `addr` from a [`MetricsExporter`] on the current tokio runtime; with `fallback`, on any
/// free loopback port when `addr` is taken. Returns the address bound.
///
/// # Errors
/// The address cannot be bound (and no fallback was allowed), or the actor cannot start.
pub async fn serve(metrics: Metrics, addr: &str, fallback: bool) -> std::io::Result<std::net::SocketAddr> {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(_) if fallback => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        Err(e) => return Err(e),
    };
    let bound = listener.local_addr()?;
    ractor::Actor::spawn(None, MetricsExporter, ExporterArgs { listener, metrics })
        .await
        .map_err(|e| std::io::Error::other(format!("the metrics exporter did not start: {e}")))?;
    Ok(bound)
}

pub struct ExporterArgs {
    pub listener: tokio::net::TcpListener,
    pub metrics: Metrics,
}

impl Actor for MetricsExporter {
    type Msg = ();
    type State = ();
    type Arguments = ExporterArgs;

    async fn pre_start(&self, _myself: ActorRef<()>, a: ExporterArgs) -> Result<(), ActorProcessingErr> {
        let ExporterArgs { listener, metrics } = a;
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    // One request per connection: read the request head, answer, close.
                    let mut buf = vec![0u8; 4096];
                    let mut n = 0;
                    while n < buf.len() {
                        match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf[n..])).await {
                            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                            Ok(Ok(k)) => n += k,
                        }
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let (status, body, kind) = if head.starts_with("GET /metrics ") {
                        ("200 OK", metrics.render(), "application/openmetrics-text; version=1.0.0; charset=utf-8")
                    } else {
                        ("404 Not Found", "tessera serves GET /metrics\n".to_string(), "text/plain")
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Ok(())
    }
}
