//! Run configuration: the TOML file form, `--set` overrides, validation, and the resolved form.
//!
//! The file is parsed into [`RunConfigFile`] (every table rejects unknown keys, so a typo is an error, not a
//! silently ignored setting), overrides are applied to the TOML tree before that, and
//! [`RunConfigFile::resolve`] checks every value and produces the [`RunConfig`] the trainer uses. The resolved
//! form is written into the run directory as `config.resolved.toml`.

use crate::data::{ShardIndex, TokenizerKind};
use crate::model::{config::preset_names, preset, AdamWConfig, CosineSchedule, GptConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Errors in a config file or an override. All are fatal before training starts, and each names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("--set {arg:?}: {reason}")]
    BadOverride { arg: String, reason: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    /// A command-line argument that cannot serve (`--nproc 0`, a malformed address).
    #[error("{flag}: {reason}")]
    Arg { flag: String, reason: String },
}

/// The longest timeout or window a config may set, in seconds (about 116 days): anything longer is a typo,
/// and would overflow the clocks it is added to.
pub const MAX_SECONDS: f64 = 1e7;

/// The largest global batch, in samples (GPT-3 trained on 1,536 of 2,048 tokens).
pub const MAX_BATCH: u64 = 1 << 20;

/// The most rank processes one launcher starts, and the most intra-op threads a rank asks for.
pub const MAX_PER_NODE: usize = 1024;
/// Most steps the data prefetcher may hold ready (`data.prefetch`).
pub const MAX_PREFETCH: usize = 1024;

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

/// The file form: what a user writes. Every field has a documented default except `data.path` and
/// `model.preset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfigFile {
    /// Directory for this run's outputs (resolved config, metrics, later checkpoints). Default `runs/default`.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Seeds initialisation and the data order. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available). Default `cpu`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto` (resume from the newest committed checkpoint in `run_dir/checkpoints`, if any), `never`, or the
    /// path of a checkpoint directory. Default `auto`.
    #[serde(default = "default_resume")]
    pub resume: String,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub launch: LaunchSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub spike: SpikeSection,
}

/// `[spike]`: loss-spike detection and automatic rollback (see `tessera::spike`). Rollbacks need
/// checkpoints (`train.checkpoint_every`); without any, a spike restarts the run from step 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpikeSection {
    /// Detect spikes and faulty ranks, and roll back automatically. Default true.
    pub enabled: bool,
    /// Normal steps the robust statistics (median, MAD) are taken over. Default 50.
    pub window: usize,
    /// Steps at the start that are learned from but never judged. Default 100.
    pub warmup_steps: u64,
    /// Consecutive anomalous steps that make a spike (llm-foundry uses 4). Default 4.
    pub patience: u64,
    /// A step's loss is anomalous above `median + max(loss_z · σ, loss_rise · median)`. Defaults 6 and 0.25.
    pub loss_z: f64,
    pub loss_rise: f64,
    /// The same for the gradient norm. Defaults 6 and 2 (three times the median).
    pub grad_z: f64,
    pub grad_rise: f64,
    /// A rank whose local loss or gradient norm is this many times the other ranks' median is faulty.
    /// Default 50 (a hard batch on one rank was measured at 12x early in a tiny run).
    pub rank_ratio: f64,
    /// Skip the data from the step before a spike's onset through its detection. Default true.
    pub skip: bool,
    /// Spikes whose onsets are this close count as the same place (escalation). Default 100.
    pub same_place_steps: u64,
    /// Rollbacks at the same place before the run stops (exit code 4). Default 3.
    pub max_repeats: usize,
    /// On the r-th repeat, the learning rate is multiplied by `lr_factor^r` for `lr_steps` steps after the
    /// rollback target (and the skipped window doubles each time). Defaults 0.5 and 100.
    pub lr_factor: f64,
    pub lr_steps: u64,
}

impl Default for SpikeSection {
    fn default() -> Self {
        let d = crate::spike::DetectorConfig::default();
        let r = crate::spike::RollbackConfig::default();
        SpikeSection {
            enabled: true,
            window: d.window,
            warmup_steps: d.warmup_steps,
            patience: d.patience,
            loss_z: d.loss_z,
            loss_rise: d.loss_rise,
            grad_z: d.grad_z,
            grad_rise: d.grad_rise,
            rank_ratio: d.rank_ratio,
            skip: r.skip,
            same_place_steps: r.same_place_steps,
            max_repeats: r.max_repeats,
            lr_factor: r.lr_factor,
            lr_steps: r.lr_steps,
        }
    }
}

impl SpikeSection {
    /// The detector's settings.
    pub fn detector(&self) -> crate::spike::DetectorConfig {
        crate::spike::DetectorConfig {
            window: self.window,
            warmup_steps: self.warmup_steps,
            patience: self.patience,
            loss_z: self.loss_z,
            loss_rise: self.loss_rise,
            grad_z: self.grad_z,
            grad_rise: self.grad_rise,
            rank_ratio: self.rank_ratio,
        }
    }

    /// The rollback policy's settings.
    pub fn rollback(&self) -> crate::spike::RollbackConfig {
        crate::spike::RollbackConfig {
            skip: self.skip,
            same_place_steps: self.same_place_steps,
            max_repeats: self.max_repeats,
            lr_factor: self.lr_factor,
            lr_steps: self.lr_steps,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.window < crate::spike::detector::MIN_WINDOW {
            return Err(invalid(
                "spike.window",
                format!("{} is below the minimum of {}", self.window, crate::spike::detector::MIN_WINDOW),
            ));
        }
        if self.patience == 0 {
            return Err(invalid("spike.patience", "must be at least 1"));
        }
        for (key, v) in [
            ("spike.loss_z", self.loss_z),
            ("spike.loss_rise", self.loss_rise),
            ("spike.grad_z", self.grad_z),
            ("spike.grad_rise", self.grad_rise),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(key, format!("{v} must be a finite number >= 0")));
            }
        }
        if !(self.rank_ratio.is_finite() && self.rank_ratio > 1.0) {
            return Err(invalid("spike.rank_ratio", format!("{} must be a finite number > 1", self.rank_ratio)));
        }
        if !(self.lr_factor > 0.0 && self.lr_factor <= 1.0) {
            return Err(invalid("spike.lr_factor", format!("{} must be in (0, 1]", self.lr_factor)));
        }
        Ok(())
    }
}

/// `[checkpoint]`: where checkpoints go and how many stay (how often is `train.checkpoint_every`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// A local directory or an object-store URL (`s3://bucket/run/checkpoints`, `gs://`, `az://`). Default
    /// `run_dir/checkpoints`.
    pub dir: Option<String>,
    /// Keep this many of the newest committed checkpoints (at least 1). Default 3.
    pub keep_last: usize,
    /// Also keep every checkpoint whose step is a multiple of this. Default: none.
    pub keep_every: Option<u64>,
    /// Write in the background while training goes on (`false`: the loop waits for each commit). Default
    /// true.
    pub async_write: bool,
    /// Seconds the coordinator waits for every rank's file before abandoning a checkpoint. Default 600.
    pub timeout_s: f64,
    /// Object-store settings that override the environment (as `data.storage_options`). Default none.
    pub storage_options: std::collections::BTreeMap<String, String>,
}

impl CheckpointSection {
    fn retention_policy(&self) -> crate::ckpt::retention::RetentionPolicy {
        crate::ckpt::retention::RetentionPolicy { keep_last: self.keep_last, keep_every: self.keep_every }
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection {
            dir: None,
            keep_last: 3,
            keep_every: None,
            async_write: true,
            timeout_s: 600.0,
            storage_options: Default::default(),
        }
    }
}

/// The resolved `[checkpoint]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    pub dir: String,
    pub keep_last: usize,
    pub keep_every: Option<u64>,
    pub async_write: bool,
    pub timeout_s: f64,
    pub storage_options: Vec<(String, String)>,
}

impl CheckpointConfig {
    /// The retention policy these settings describe.
    pub fn retention(&self) -> crate::ckpt::retention::RetentionPolicy {
        crate::ckpt::retention::RetentionPolicy { keep_last: self.keep_last, keep_every: self.keep_every }
    }
}

/// `[launch]`: how `tessera launch` forms the gang.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LaunchSection {
    /// Rank processes per node (`--nproc` overrides). Default 1.
    pub nproc: usize,
    /// Address the ranks' communicators listen on. Default `127.0.0.1`: nothing listens beyond loopback
    /// unless configured. On several machines `0.0.0.0`: each rank is then reached at the address node 0's
    /// rendezvous sees it from.
    pub bind: String,
    /// Seconds for every rank to reach the rendezvous. Default 60.
    pub rdzv_timeout_s: f64,
    /// Deadline of each collective, in seconds. Default 300.
    pub comm_timeout_s: f64,
    /// Seconds without a heartbeat, or without any rank making progress, before the gang counts as hung.
    /// 0 (the default) derives it from observed step times: 300 s until the first steps are seen, then
    /// 10 × the slowest step so far, at least 60 s.
    pub hang_timeout_s: f64,
    /// Gang restarts allowed within `restart_window_s`; one more stops the run (exit code 3). Default 3.
    pub max_restarts: usize,
    /// Default 3600.
    pub restart_window_s: f64,
    /// Seconds a launch waits for storage that does not answer (the corpus's or the checkpoints' object
    /// store, or a network file system) before it gives up (exit code 3). Such a wait is not counted as a
    /// restart; the gang restarts from the newest committed checkpoint once the store answers. 0 gives up at
    /// once. Default 1800.
    pub storage_wait_s: f64,
}

impl Default for LaunchSection {
    fn default() -> Self {
        LaunchSection {
            nproc: 1,
            bind: "127.0.0.1".into(),
            rdzv_timeout_s: 60.0,
            comm_timeout_s: 300.0,
            hang_timeout_s: 0.0,
            max_restarts: 3,
            restart_window_s: 3600.0,
            storage_wait_s: 1800.0,
        }
    }
}

/// `[model]`: a preset, optionally with fields overridden.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// One of the presets (`tessera presets` lists them).
    pub preset: String,
    pub n_layer: Option<i64>,
    pub n_head: Option<i64>,
    pub d_model: Option<i64>,
    /// Context length (the number of learned positions). Default: the preset's.
    pub seq_len: Option<i64>,
    /// Default: the corpus tokenizer's vocabulary, padded to a multiple of 128 for GPT-2 (50,304).
    pub vocab_size: Option<i64>,
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A corpus prepared by `tessera data prepare`: a local directory, or a URL (`s3://bucket/corpus`,
    /// `gs://`, `az://`) holding the same files.
    pub path: String,
    /// Share of samples held out for evaluation, in [0, 0.5]. Default 0.01.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Shard locality: shuffle blocks of this many neighbouring samples, then within each block. Default 1
    /// (a plain shuffle).
    #[serde(default = "default_block")]
    pub block: u64,
    /// Steps prepared ahead of the training loop by the prefetch thread. Default 4.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Local cache for a remote corpus's shards. Default `$TESSERA_CACHE/shards/<corpus>`
    /// (`~/.cache/tessera/shards/<corpus>`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Cache budget in GiB; the least recently fetched shards are evicted beyond it. Default 16.
    #[serde(default = "default_cache_gb")]
    pub cache_gb: f64,
    /// Object-store settings that override the environment, e.g. `{ endpoint = "http://127.0.0.1:9000",
    /// allow_http = "true" }` for an S3-compatible server. Default none.
    #[serde(default)]
    pub storage_options: std::collections::BTreeMap<String, String>,
}

/// `[train]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimizer steps to run. Default 100.
    pub steps: u64,
    /// Global batch in samples (sequences) per optimizer step. Default 16.
    pub batch_size: u64,
    /// Samples per forward/backward on each rank; the rest of the rank's share of the batch is gradient
    /// accumulation. A number (which must divide `batch_size`, and each rank's share of it), or `"auto"`:
    /// start at the rank's whole share and halve on out of memory. Default: each rank's whole share (no
    /// accumulation), whatever the world size.
    pub micro_batch: Option<MicroBatch>,
    /// Peak learning rate. Default 6e-4.
    pub lr: f64,
    /// Linear warm-up steps. Default 10.
    pub warmup_steps: u64,
    /// Floor of the cosine decay as a fraction of `lr`. Default 0.1.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay on matmul weights. Default 0.1.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables. Default 1.0.
    pub grad_clip: f64,
    /// Recompute each transformer block's activations in backward instead of keeping them (activation
    /// checkpointing): less memory, about one more forward pass of compute, the same results. Default false.
    pub recompute: bool,
    /// Tessera's own CUDA kernels: the cross-entropy, the residual add fused into LayerNorm, the gradient
    /// norm and AdamW, and bf16 weight copies written by that AdamW (what `tessera bench --kernels` compares,
    /// and `tessera doctor` checks). CUDA only; elsewhere nothing changes. Default false until a GPU has
    /// measured them.
    pub kernels: bool,
    /// Steps between metric lines (and progress-bar updates that read the loss back). Default 10.
    pub log_every: u64,
    /// Steps between readings of the steps' losses and gradient norms from the device: each reading waits
    /// for the device once, then the spike detector judges every step since the last one, in order. Metric
    /// lines, evaluations, replica checks, checkpoints, a preemption (which the next step agrees on) and the
    /// last step read too, so a checkpoint is only written once every step before it has been judged.
    /// Default 8.
    pub read_every: u64,
    /// Steps between evaluations on the held-out split; 0 evaluates only at the end. Default 100.
    pub eval_every: u64,
    /// Micro-batches per evaluation. Default 8.
    pub eval_batches: u64,
    /// Intra-op CPU threads for libtorch. 0 (the default) means one per rank on the CPU, which keeps CPU runs
    /// bit-reproducible across processes (with more, libtorch's kernels were measured to drift apart between
    /// a run and its resumption, or between replicas), and libtorch's default on CUDA hosts.
    pub threads: u32,
    /// Peak dense bf16 TFLOP/s of one accelerator, for MFU. Default 989 (H100 SXM).
    pub peak_tflops: f64,
    /// ZeRO stage: 0 replicates the optimizer, 1 shards its state across ranks, 2 also reduce-scatters the
    /// gradients. Default 0.
    pub zero: u8,
    /// Steps between checks that every rank's weights are bit-identical (and at the end); 0 checks only at
    /// the start and end. Default 100.
    pub check_every: u64,
    /// Steps between checkpoints (written in the background with `checkpoint.async_write`, the default, into
    /// `checkpoint.dir`); 0 disables. Default 0.
    pub checkpoint_every: u64,
    /// Size in MB (of fp32 gradient) of the buckets whose all-reduce overlaps backward, on transports that
    /// allow it (the TCP ring), with ZeRO 0 or 1 and more than one rank; 0 reduces the whole gradient after
    /// backward instead. Default 25 (PyTorch DDP's).
    pub bucket_mb: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        let adam = AdamWConfig::default();
        TrainSection {
            steps: 100,
            batch_size: 16,
            micro_batch: None,
            lr: 6e-4,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: adam.weight_decay,
            beta1: adam.beta1,
            beta2: adam.beta2,
            eps: adam.eps,
            grad_clip: 1.0,
            recompute: false,
            kernels: false,
            log_every: 10,
            read_every: 8,
            eval_every: 100,
            eval_batches: 8,
            threads: 0,
            peak_tflops: 989.0,
            zero: 0,
            check_every: 100,
            checkpoint_every: 0,
            bucket_mb: 25.0,
        }
    }
}

/// `train.micro_batch` as written: a number of samples, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicroBatch {
    /// Samples per forward/backward on each rank, fixed for the whole run: out of memory is an error.
    Samples(u64),
    /// Each rank starts with its whole share of the batch in one forward/backward, and every rank halves it
    /// (doubling the accumulation) when any of them runs out of memory, retrying the same step (Composer's
    /// `device_train_microbatch_size = "auto"`).
    Auto,
}

impl Serialize for MicroBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MicroBatch::Samples(n) => s.serialize_u64(*n),
            MicroBatch::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for MicroBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MicroBatch;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a positive number of samples (e.g. micro_batch = 4) or the string \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<MicroBatch, E> {
                Ok(MicroBatch::Samples(n)) // 0 is rejected by `resolve`, which names the key
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<MicroBatch, E> {
                u64::try_from(n)
                    .map(MicroBatch::Samples)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MicroBatch, E> {
                match v.trim() {
                    "auto" => Ok(MicroBatch::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn one() -> u64 {
    1
}

fn default_run_dir() -> PathBuf {
    PathBuf::from("runs/default")
}
fn default_device() -> String {
    "cpu".into()
}
fn default_resume() -> String {
    "auto".into()
}
fn default_eval_fraction() -> f64 {
    0.01
}
fn default_block() -> u64 {
    1
}
fn default_prefetch() -> usize {
    4
}
fn default_cache_gb() -> f64 {
    16.0
}

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Auto,
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda`, `cuda:N` or `auto`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(DeviceSpec::Cpu),
            "cuda" => Some(DeviceSpec::Cuda(0)),
            "auto" => Some(DeviceSpec::Auto),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(DeviceSpec::Cuda),
        }
    }
}

/// The resolved configuration: every value checked, every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub run_dir: PathBuf,
    pub seed: u64,
    pub device: DeviceSpec,
    pub preset: String,
    pub model: GptConfig,
    pub data_path: String,
    pub tokenizer: TokenizerKind,
    pub eval_fraction: f64,
    pub block: u64,
    pub prefetch: usize,
    pub cache_dir: PathBuf,
    pub cache_bytes: u64,
    pub storage_options: Vec<(String, String)>,
    pub steps: u64,
    pub batch_size: u64,
    /// Samples per forward/backward on each rank; with `micro_batch_auto`, `batch_size` (the trainer starts
    /// at each rank's share of it and halves on out of memory).
    pub micro_batch: u64,
    /// `batch_size / micro_batch`: micro-batches per step over all ranks (1 with `micro_batch_auto`).
    pub accum_steps: u64,
    /// `train.micro_batch = "auto"`: the micro-batch adapts to the device's memory (see [`MicroBatch::Auto`]).
    #[serde(default)]
    pub micro_batch_auto: bool,
    /// `train.micro_batch` not written: each rank takes its whole share in one micro-batch, whatever the
    /// world size ([`RunConfig::micro_batch_for`]).
    #[serde(default)]
    pub micro_batch_whole_share: bool,
    pub schedule: CosineSchedule,
    pub adamw: AdamWConfig,
    pub grad_clip: f64,
    /// `train.recompute`: activation recomputation per block.
    #[serde(default)]
    pub recompute: bool,
    /// `train.kernels`: Tessera's own CUDA kernels.
    #[serde(default)]
    pub kernels: bool,
    pub log_every: u64,
    /// `train.read_every` (a config written before it existed reads every step).
    #[serde(default = "one")]
    pub read_every: u64,
    pub eval_every: u64,
    pub eval_batches: u64,
    pub threads: u32,
    pub peak_tflops: f64,
    pub zero: u8,
    pub check_every: u64,
    pub checkpoint_every: u64,
    /// Elements per overlapped gradient bucket; 0: no overlap.
    pub bucket_elems: i64,
    pub resume: String,
    pub launch: LaunchSection,
    pub checkpoint: CheckpointConfig,
    pub spike: SpikeSection,
    /// A rollback to carry out when this run starts (the launcher's supervisor or `tessera train` sets it
    /// after a spike). Not part of the config's hash: every rank of the restarted gang gets the same one.
    #[serde(skip)]
    pub rollback: Option<crate::spike::Directive>,
    /// The launch attempt this run belongs to (0 for `tessera train`); set by the gang, not by the user.
    #[serde(skip)]
    pub attempt: u64,
}

impl RunConfig {
    /// Checks that the batch divides over `world` ranks, and each rank's share into micro-batches: before a
    /// launcher starts any process, and again in each rank.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming `train.batch_size` or `train.micro_batch`.
    pub fn check_world(&self, world: u64) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid { key: key.into(), reason };
        let cfg = self;
        if cfg.batch_size % world != 0 {
            return Err(invalid(
                "train.batch_size",
                format!(
                    "{} must be a multiple of the world size ({world}): every rank takes an equal share",
                    cfg.batch_size
                ),
            ));
        }
        let share = cfg.batch_size / world;
        if share % cfg.micro_batch_for(world) != 0 {
            return Err(invalid(
                "train.micro_batch",
                format!(
                    "{} must divide each rank's share of train.batch_size ({} / {world} ranks = {share}); write a \
                     divisor of {share}, or \"auto\" to start at {share} and halve it on out of memory",
                    cfg.micro_batch, cfg.batch_size
                ),
            ));
        }
        Ok(())
    }

    /// Samples per forward/backward on each of `world` ranks at the start: the configured number, or each
    /// rank's whole share of the batch (`"auto"`, or `train.micro_batch` not written).
    pub fn micro_batch_for(&self, world: u64) -> u64 {
        if self.micro_batch_auto || self.micro_batch_whole_share {
            self.batch_size / world.max(1)
        } else {
            self.micro_batch
        }
    }

    /// A stable hash of the resolved config: ranks with different configs refuse to form a gang, and a
    /// checkpoint records the hash of the run that wrote it.
    pub fn hash(&self) -> String {
        let text = toml::to_string(self).expect("resolved config serializes");
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
    }
}

/// Reads a config file and applies `--set key=value` overrides (dotted keys, TOML values; a value that is
/// not valid TOML is taken as a string).
///
/// # Errors
/// [`ConfigError::Read`], [`ConfigError::Parse`] (with the line, when no override is given, and the unknown
/// or mistyped key), or
/// [`ConfigError::BadOverride`].
pub fn load(path: &Path, overrides: &[String]) -> Result<RunConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse(&text, path, overrides)
}

/// [`load`] on text already read; `path` is only used in messages.
///
/// # Errors
/// As [`load`].
pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<RunConfigFile, ConfigError> {
    let parse_err = |e: toml::de::Error| ConfigError::Parse { path: path.into(), message: e.to_string() };
    let mut table: toml::Table = toml::from_str(text).map_err(parse_err)?;
    if overrides.is_empty() {
        // Straight from the text, so errors point at the line and column; the tree-based error below names
        // the key's full path (`train.steps`), which the positioned one leaves out, so both are reported.
        if let Err(positioned) = toml::from_str::<RunConfigFile>(text) {
            let keyed = RunConfigFile::deserialize(toml::Value::Table(table)).err();
            let key = keyed
                .map(|e| e.to_string())
                .and_then(|m| m.rfind("in `").map(|i| m[i..].trim().to_string()))
                .map(|k| format!("\n{k}"))
                .unwrap_or_default();
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!("{}{key}", positioned.to_string().trim_end()),
            });
        }
    }
    for arg in overrides {
        apply_override(&mut table, arg)?;
    }
    RunConfigFile::deserialize(toml::Value::Table(table))
        .map_err(|e| ConfigError::Parse { path: path.into(), message: format!("{e} (after applying --set overrides)") })
}

/// [`load`], then reads the corpus index `data.path` names (local or remote) and resolves against it: what
/// `train`, `launch` and every worker do before anything else.
///
/// # Errors
/// Config errors, and data errors reading the corpus index.
pub fn load_resolved(path: &Path, overrides: &[String]) -> crate::Result<RunConfig> {
    let file = load(path, overrides)?;
    if let Some(why) = crate::storage::mistyped_url(&file.data.path) {
        return Err(invalid("data.path", why).into()); // before looking for a corpus in a directory of that name
    }
    let options: Vec<(String, String)> = file.data.storage_options.clone().into_iter().collect();
    let index = ShardIndex::load_from(&file.data.path, &options)?;
    Ok(file.resolve(&index)?)
}

fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::BadOverride { arg: arg.into(), reason: reason.into() };
    let (key, raw) = arg.split_once('=').ok_or_else(|| bad("expected key=value, e.g. train.lr=3e-4"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(bad("the key is empty; use a dotted key such as train.steps"));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut node = table;
    for p in parts {
        let entry = node.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| bad(&format!("`{p}` is a value, not a table")))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

impl ModelSection {
    /// The model shape: the preset with this section's overrides, its vocabulary sized to `corpus`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key: an unknown preset, a shape that cannot be built, a vocabulary
    /// smaller than the corpus's.
    fn resolve(&self, corpus: &ShardIndex) -> Result<GptConfig, ConfigError> {
        let base = preset(&self.preset).ok_or_else(|| {
            invalid(
                "model.preset",
                format!("unknown preset {:?}; choose one of {}", self.preset, preset_names().join(", ")),
            )
        })?;
        let data_vocab = corpus.vocab_size as i64;
        let default_vocab = match corpus.tokenizer {
            TokenizerKind::Gpt2 => crate::model::config::GPT2_PADDED_VOCAB,
            TokenizerKind::Byte => data_vocab,
        };
        let model = GptConfig {
            n_layer: self.n_layer.unwrap_or(base.n_layer),
            n_head: self.n_head.unwrap_or(base.n_head),
            d_model: self.d_model.unwrap_or(base.d_model),
            seq_len: self.seq_len.unwrap_or(base.seq_len),
            vocab_size: self.vocab_size.unwrap_or(default_vocab),
        };
        model.validate().map_err(|reason| {
            let key = reason.split_whitespace().next().unwrap_or("model").to_string();
            ConfigError::Invalid { key, reason }
        })?;
        if model.vocab_size < data_vocab {
            return Err(invalid(
                "model.vocab_size",
                format!(
                    "{} is smaller than the corpus's {:?} vocabulary of {data_vocab}",
                    model.vocab_size, corpus.tokenizer
                ),
            ));
        }
        Ok(model)
    }
}

impl DataSection {
    /// Checks the data settings and returns the shard cache's directory (the default one under
    /// `TESSERA_CACHE`, named after `data.path`, unless `data.cache_dir` names one).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    fn check(&self) -> Result<PathBuf, ConfigError> {
        if !(0.0..=0.5).contains(&self.eval_fraction) {
            return Err(invalid("data.eval_fraction", format!("{} is outside [0, 0.5]", self.eval_fraction)));
        }

        if self.block == 0 {
            return Err(invalid("data.block", "must be at least 1 (1 is a plain shuffle)"));
        }
        if self.prefetch == 0 || self.prefetch > MAX_PREFETCH {
            return Err(invalid(
                "data.prefetch",
                format!(
                    "{} must be from 1 to {MAX_PREFETCH} steps (each holds a step's tokens in memory)",
                    self.prefetch
                ),
            ));
        }
        if !(self.cache_gb.is_finite() && self.cache_gb > 0.0) {
            return Err(invalid("data.cache_gb", format!("{} must be a positive number of GiB", self.cache_gb)));
        }
        let cache_dir = self.cache_dir.clone().unwrap_or_else(|| {
            let name: String = self
                .path
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
                .collect();
            crate::storage::default_cache_dir().join(name)
        });
        if cache_dir.to_str().is_none() {
            // The resolved config is TOML, which holds only UTF-8 text (TESSERA_CACHE or HOME may not be).
            return Err(invalid(
                "data.cache_dir",
                format!(
                    "{} is not UTF-8 text; set data.cache_dir (or TESSERA_CACHE) to a UTF-8 path",
                    cache_dir.display()
                ),
            ));
        }
        Ok(cache_dir)
    }
}

impl TrainSection {
    /// Checks the training settings; returns the micro-batch as written (the whole batch where it is
    /// `"auto"` or unset) and whether it is `"auto"`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    fn check(&self) -> Result<(u64, bool), ConfigError> {
        if self.steps == 0 {
            return Err(invalid("train.steps", "must be at least 1"));
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            return Err(invalid(
                "train.batch_size",
                format!("{} must be between 1 and {MAX_BATCH} samples", self.batch_size),
            ));
        }
        if self.threads as usize > MAX_PER_NODE {
            return Err(invalid(
                "train.threads",
                format!("{} is more than {MAX_PER_NODE}; 0 (the default) picks for you", self.threads),
            ));
        }
        let (micro, micro_auto) = match self.micro_batch {
            None => (self.batch_size, false),
            Some(MicroBatch::Auto) => (self.batch_size, true),
            Some(MicroBatch::Samples(n)) => (n, false),
        };
        if micro == 0 || self.batch_size % micro != 0 {
            let divisors: Vec<String> =
                (1..=self.batch_size).filter(|d| self.batch_size % d == 0).take(12).map(|d| d.to_string()).collect();
            return Err(invalid(
                "train.micro_batch",
                format!(
                    "{micro} must be at least 1 and divide train.batch_size ({}); write one of {} (samples per \
                 forward/backward on each rank), or \"auto\" to start with each rank's whole share and halve \
                 it on out of memory",
                    self.batch_size,
                    divisors.join(", ")
                ),
            ));
        }
        for (key, v) in [("train.lr", self.lr), ("train.eps", self.eps), ("train.peak_tflops", self.peak_tflops)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(key, format!("{v} must be a positive number")));
            }
        }
        for (key, v) in [("train.beta1", self.beta1), ("train.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(key, format!("{v} is outside [0, 1)")));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(invalid("train.min_lr_ratio", format!("{} is outside [0, 1]", self.min_lr_ratio)));
        }
        for (key, v) in [("train.weight_decay", self.weight_decay), ("train.grad_clip", self.grad_clip)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(key, format!("{v} must be zero or positive")));
            }
        }
        if self.warmup_steps > self.steps {
            return Err(invalid(
                "train.warmup_steps",
                format!("{} is more than train.steps ({})", self.warmup_steps, self.steps),
            ));
        }
        if !(self.bucket_mb.is_finite() && self.bucket_mb >= 0.0) {
            return Err(invalid(
                "train.bucket_mb",
                format!("{} must be 0 (no overlap) or a positive number of MB", self.bucket_mb),
            ));
        }
        if self.zero > 2 {
            return Err(invalid(
                "train.zero",
                format!("{} is not a ZeRO stage this Tessera has (0, 1 or 2)", self.zero),
            ));
        }
        if self.log_every == 0 {
            return Err(invalid("train.log_every", "must be at least 1"));
        }
        if self.read_every == 0 {
            return Err(invalid("train.read_every", "must be at least 1 (1 reads every step)"));
        }
        Ok((micro, micro_auto))
    }
}

impl LaunchSection {
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    fn check(&self) -> Result<(), ConfigError> {
        if self.nproc == 0 || self.nproc > MAX_PER_NODE {
            return Err(invalid("launch.nproc", format!("{} must be between 1 and {MAX_PER_NODE}", self.nproc)));
        }
        if !(self.hang_timeout_s.is_finite() && (0.0..=MAX_SECONDS).contains(&self.hang_timeout_s)) {
            return Err(invalid(
                "launch.hang_timeout_s",
                format!("{} must be 0 (derived) or a number of seconds up to {MAX_SECONDS:e}", self.hang_timeout_s),
            ));
        }
        for (key, v) in [
            ("launch.rdzv_timeout_s", self.rdzv_timeout_s),
            ("launch.comm_timeout_s", self.comm_timeout_s),
            ("launch.restart_window_s", self.restart_window_s),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= MAX_SECONDS) {
                return Err(invalid(key, format!("{v} must be a positive number of seconds, at most {MAX_SECONDS:e}")));
            }
        }
        if !(self.storage_wait_s.is_finite() && (0.0..=MAX_SECONDS).contains(&self.storage_wait_s)) {
            return Err(invalid(
                "launch.storage_wait_s",
                format!("{} must be a number of seconds from 0 (do not wait) to {MAX_SECONDS:e}", self.storage_wait_s),
            ));
        }
        if self.bind.parse::<std::net::IpAddr>().is_err() {
            return Err(invalid("launch.bind", format!("{:?} is not an IP address", self.bind)));
        }
        Ok(())
    }
}

impl CheckpointSection {
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(why) = self.dir.as_deref().and_then(crate::storage::mistyped_url) {
            return Err(invalid("checkpoint.dir", why));
        }
        self.retention_policy().validate().map_err(|e| {
            let key = if self.keep_last == 0 { "checkpoint.keep_last" } else { "checkpoint.keep_every" };
            invalid(key, e.to_string())
        })?;
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= MAX_SECONDS) {
            return Err(invalid(
                "checkpoint.timeout_s",
                format!("{} must be a positive number of seconds, at most {MAX_SECONDS:e}", self.timeout_s),
            ));
        }
        if self.dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            return Err(invalid("checkpoint.dir", "is empty; leave it out for run_dir/checkpoints"));
        }
        Ok(())
    }
}

impl RunConfigFile {
    /// Checks every value against the corpus it will train on and fills in defaults.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first key whose value is impossible, and why.
    pub fn resolve(&self, corpus: &ShardIndex) -> Result<RunConfig, ConfigError> {
        let device = DeviceSpec::parse(&self.device)
            .ok_or_else(|| invalid("device", format!("{:?} is not cpu, cuda, cuda:N or auto", self.device)))?;
        let model = self.model.resolve(corpus)?;
        let cache_dir = self.data.check()?;
        let (micro, micro_auto) = self.train.check()?;
        self.launch.check()?;
        self.checkpoint.check()?;
        self.spike.validate()?;
        let (m, d, t, l, c) = (&self.model, &self.data, &self.train, &self.launch, &self.checkpoint);
        if d.eval_fraction > 0.0 && t.eval_batches == 0 {
            return Err(invalid("train.eval_batches", "must be at least 1 when data.eval_fraction > 0"));
        }

        Ok(RunConfig {
            run_dir: self.run_dir.clone(),
            seed: self.seed,
            device,
            preset: m.preset.clone(),
            model,
            data_path: d.path.clone(),
            tokenizer: corpus.tokenizer,
            eval_fraction: d.eval_fraction,
            block: d.block,
            prefetch: d.prefetch,
            cache_dir,
            cache_bytes: (d.cache_gb * (1u64 << 30) as f64) as u64,
            storage_options: d.storage_options.clone().into_iter().collect(),
            steps: t.steps,
            batch_size: t.batch_size,
            micro_batch: micro,
            accum_steps: t.batch_size / micro,
            micro_batch_auto: micro_auto,
            micro_batch_whole_share: t.micro_batch.is_none(),
            schedule: CosineSchedule {
                lr: t.lr,
                warmup_steps: t.warmup_steps,
                total_steps: t.steps,
                min_lr_ratio: t.min_lr_ratio,
            },
            adamw: AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay },
            grad_clip: t.grad_clip,
            recompute: t.recompute,
            kernels: t.kernels,
            log_every: t.log_every,
            read_every: t.read_every,
            eval_every: t.eval_every,
            eval_batches: t.eval_batches,
            threads: t.threads,
            peak_tflops: t.peak_tflops,
            zero: t.zero,
            check_every: t.check_every,
            checkpoint_every: t.checkpoint_every,
            bucket_elems: (t.bucket_mb * 1e6 / 4.0) as i64,
            resume: self.resume.clone(),
            launch: l.clone(),
            checkpoint: CheckpointConfig {
                dir: c.dir.clone().unwrap_or_else(|| self.run_dir.join("checkpoints").display().to_string()),
                keep_last: c.keep_last,
                keep_every: c.keep_every,
                async_write: c.async_write,
                timeout_s: c.timeout_s,
                storage_options: c.storage_options.clone().into_iter().collect(),
            },
            spike: self.spike.clone(),
            rollback: None,
            attempt: 0,
        })
    }
}
