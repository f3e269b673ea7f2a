//! The trainer's side of checkpoints: what a rank saves, how a run resumes (on any number of ranks), and the
//! step-loop hook that hands state to the writer actor ([`crate::actors::ckpt_writer`]).
//!
//! What each rank saves: rank 0 the flat parameters; every rank that owns optimizer state not held elsewhere
//! (rank 0 without ZeRO, each rank with it) its AdamW moments, as one contiguous shard of the flat layout.
//! The manifest carries the step (which is also AdamW's step count and the learning-rate schedule's
//! position), tokens seen, world size, ZeRO stage, model shape, config hash and the data stream's state.
//! Training uses no random numbers after initialisation, so there is no RNG state to save.
//!
//! Resharding: because the optimizer state is one flat buffer cut into equal contiguous shards, a checkpoint
//! written by W ranks at any ZeRO stage loads on W' ranks at any stage: each new rank reads only the old
//! files whose range overlaps its own and copies the overlap.

use super::{io_err, Trainer};
use crate::actors::ckpt_writer::{CkptEvent, CommitJob, SaveJob};
use crate::ckpt::manifest::{Manifest, FORMAT};
use crate::ckpt::store::{self, CkptError, CkptStore, Loaded};
use crate::error::{Error, Result};
use crate::model::optim::ShardLayout;
use serde::Serialize;
use std::time::{Duration, Instant};
use tch::Tensor;

/// How long the step loop waits for the previous checkpoint before it gives the next one up (see
/// [`Trainer::checkpoint_in_flight`]): 30 s, or half of `checkpoint.timeout_s` if shorter. A normal write is
/// done long before; a store this slow would stall every rank at every checkpoint.
fn busy_wait(timeout_s: f64) -> Duration {
    Duration::from_secs(30).min(Duration::from_secs_f64(timeout_s / 2.0))
}

/// A metrics line for a checkpoint: what the step loop paid, and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct CkptRecord {
    /// `saved` (handed to the writer), `committed`, `abandoned`, `write_failed`, `busy` (not taken: the
    /// previous one was still being written), or `skipped` (found unreadable while resuming).
    pub checkpoint: &'static str,
    pub step: u64,
    /// Time the step loop was blocked (`saved` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall_ms: Option<f64>,
    /// Whether training went on during the write (`saved` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_write: Option<bool>,
    /// Seconds from hand-off to commit (`committed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_s: Option<f64>,
    /// Bytes of the checkpoint's files, all ranks (`committed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl CkptRecord {
    pub(super) fn new(checkpoint: &'static str, step: u64) -> Self {
        CkptRecord { checkpoint, step, stall_ms: None, async_write: None, commit_s: None, bytes: None, detail: None }
    }

    /// The record and the line to show for a writer or coordinator event.
    pub fn of_event(e: &CkptEvent) -> Option<(Self, String)> {
        match e {
            CkptEvent::Written { .. } => None,
            CkptEvent::WriteFailed { step, reason } => Some((
                CkptRecord { detail: Some(reason.clone()), ..Self::new("write_failed", *step) },
                format!("tessera: warning: this rank could not write the checkpoint after step {step}: {reason}"),
            )),
            CkptEvent::Committed { step, location, secs, removed, bytes } => {
                let gone = if removed.is_empty() { String::new() } else { format!(" (retention removed {removed:?})") };
                Some((
                    CkptRecord {
                        commit_s: Some(*secs),
                        bytes: Some(*bytes),
                        detail: Some(location.clone()),
                        ..Self::new("committed", *step)
                    },
                    format!("tessera: checkpoint after step {step} committed at {location} in {secs:.2}s{gone}"),
                ))
            }
            CkptEvent::Abandoned { step, reason } => Some((
                CkptRecord { detail: Some(reason.clone()), ..Self::new("abandoned", *step) },
                format!(
                    "tessera: warning: checkpoint after step {step} abandoned ({reason}); training goes on and the \
                     previous checkpoint stays the latest"
                ),
            )),
        }
    }
}

impl Trainer {
    /// Loads the checkpoint `cfg.resume` names (`auto`: the newest committed one that verifies, if any).
    /// Checkpoints skipped as unreadable are returned for the run's metrics.
    pub(super) fn resume(&mut self, store: &CkptStore) -> Result<Vec<(u64, String)>> {
        let mut skipped = vec![];
        if let Some(d) = self.cfg.rollback {
            return self.roll_back(store, &d).map(|()| skipped);
        }
        let loaded = match self.cfg.resume.as_str() {
            "never" => None,
            "auto" => {
                let mut found = None;
                let mut corrupt = vec![];
                let candidates = self.gangs_candidates(store)?;
                let tried = candidates.len();
                for c in candidates {
                    match store.load(&c.name) {
                        Ok(l) => {
                            found = Some(l);
                            break;
                        }
                        // A store that does not answer is waited for, not passed over: another rank may read
                        // this checkpoint, and the gang must resume from one.
                        Err(CkptError::Storage(e)) if e.is_unavailable() => return Err(Error::Ckpt(e.into())),
                        Err(e) => {
                            crate::say!("tessera: warning: skipping a checkpoint that does not verify: {e}");
                            skipped.push((c.step, e.to_string()));
                            // A checksum or size mismatch will not heal; an I/O error might (a store that
                            // is briefly unreachable), so only the former is removed.
                            if matches!(e, CkptError::Manifest { .. }) {
                                corrupt.push(c.step);
                            }
                        }
                    }
                }
                // Committed checkpoints exist and none loads: starting over would silently throw the run's
                // progress away (and write a second history into its ledgers). Nothing is touched; the
                // user decides.
                if found.is_none() && tried > 0 {
                    let reason = if corrupt.len() == tried {
                        format!(
                            "none of its {tried} committed checkpoint(s) verifies (see the warnings above); nothing \
                             was removed. Restore a checkpoint's files, or start the run over from step 0 with \
                             resume = \"never\" (its checkpoints are then replaced as it commits its own)"
                        )
                    } else {
                        format!(
                            "none of its {tried} committed checkpoint(s) could be read (see the warnings above); \
                             run again once the store is reachable"
                        )
                    };
                    let path = store.describe("").trim_end_matches('/').into();
                    return Err(Error::Ckpt(if corrupt.len() == tried {
                        CkptError::Incompatible { path, reason }
                    } else {
                        CkptError::Io { path, source: std::io::Error::other(reason) }
                    }));
                }
                // Rank 0 sets the corrupt checkpoints newer than the one found aside, so that nothing tries
                // them again and training commits those steps afresh. Every rank verifies every file, so all
                // agree on them.
                if self.is_leader() {
                    for step in corrupt {
                        match store.set_aside(step) {
                            Ok(Some((kept, pruned))) => {
                                crate::say!(
                                    "tessera: moved the corrupt checkpoint after step {step} aside to {kept} (delete \
                                     it once inspected)"
                                );
                                for p in pruned {
                                    crate::say!(
                                        "tessera: removed {p}: only the newest {} set-aside checkpoints are kept",
                                        crate::ckpt::store::KEEP_SET_ASIDE
                                    );
                                }
                            }
                            Ok(None) => crate::say!("tessera: removed the corrupt checkpoint after step {step}"),
                            Err(e) => crate::say!(
                                "tessera: warning: cannot set the corrupt checkpoint after step {step} aside: {e}"
                            ),
                        }
                    }
                }
                found
            }
            target => {
                if !crate::storage::is_url(target) && !std::path::Path::new(target).exists() {
                    return Err(Error::Ckpt(CkptError::Incompatible {
                        path: target.into(),
                        reason: "does not exist: resume names a checkpoint (.../checkpoints/step-N), a run \
                                 directory or a checkpoint directory, or is \"auto\" or \"never\""
                            .into(),
                    }));
                }
                let (s, name) = store::open_target(target, &self.cfg.checkpoint.storage_options)?;
                let l = match name {
                    Some(n) => s.load(&n)?,
                    None => s.newest(|e| crate::say!("tessera: warning: skipping: {e}"))?.ok_or_else(|| {
                        CkptError::Incompatible {
                            path: target.into(),
                            reason: "holds no committed checkpoint that verifies".into(),
                        }
                    })?,
                };
                Some(l)
            }
        };
        if let Some(l) = loaded {
            self.restore(&l)?;
            self.resumed_from = Some((l.manifest.step, l.location.clone()));
        }
        Ok(skipped)
    }

    /// The committed checkpoints `auto` may resume from, newest first: those up to rank 0's newest. Ranks list
    /// the store a moment apart, and a commit can land in between (a previous attempt's coordinator finishing
    /// in a process that was reset in place), so each rank's own newest could differ; following rank 0 keeps
    /// the gang on one. A rank that does not find rank 0's newest lists again for a few seconds, then fails:
    /// it reads another store than rank 0 does.
    fn gangs_candidates(&mut self, store: &CkptStore) -> Result<Vec<store::Listed>> {
        let mut listed = store.list()?;
        let mine = listed.iter().rev().find(|c| c.committed).map(|c| c.step);
        let target = self.rank0s(mine.map_or(-1, |s| s as i64))?;
        let has = |l: &[store::Listed], t: i64| l.iter().any(|c| c.committed && c.step as i64 == t);
        let mut tries = 0;
        while target >= 0 && !has(&listed, target) {
            tries += 1;
            if tries > 20 {
                return Err(Error::Ckpt(CkptError::Incompatible {
                    path: store.describe(&crate::ckpt::manifest::checkpoint_name(target as u64)).into(),
                    reason: "rank 0 resumes from this checkpoint, but this rank does not find it committed in its \
                             checkpoint store: every rank must read one store (checkpoint.dir on a file system \
                             every node mounts at the same path, or object storage)"
                        .into(),
                }));
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
            listed = store.list()?;
        }
        Ok(listed.into_iter().rev().filter(|c| c.committed && c.step as i64 <= target).collect())
    }

    /// Rank 0's `value`, on every rank (its own on a single rank).
    fn rank0s(&mut self, value: i64) -> Result<i64> {
        Ok(self.every_ranks(value)?[0])
    }

    /// Every rank's `value`, by rank, on every rank (a collective; none on a single rank).
    fn every_ranks(&mut self, value: i64) -> Result<Vec<i64>> {
        if self.comm.world() == 1 {
            return Ok(vec![value]);
        }
        let mine = Tensor::from_slice(&[value]).to_device(self.device);
        let mut all = Tensor::zeros([self.comm.world() as i64], (tch::Kind::Int64, self.device));
        self.comm.all_gather(&mine, &mut all).map_err(super::step::StepError::from)?;
        Ok(Vec::<i64>::try_from(&all.to_device(tch::Device::Cpu)).expect("int64 tensor"))
    }

    /// Carries out a rollback: loads the checkpoint of the directive's target step (or starts over from the
    /// initial weights at 0), then gives the rest of the epoch its fresh order and skipped window, and lowers
    /// the learning rate if asked.
    fn roll_back(&mut self, store: &CkptStore, d: &crate::spike::Directive) -> Result<()> {
        if d.target > 0 {
            let listed = store.list()?;
            let name =
                listed.iter().find(|c| c.committed && c.step == d.target).map(|c| c.name.clone()).ok_or_else(|| {
                    CkptError::Incompatible {
                        path: store.describe(&format!("step {}", d.target)).into(),
                        reason: "the rollback target is not among the committed checkpoints (removed meanwhile?)"
                            .into(),
                    }
                })?;
            let l = store.load(&name)?;
            self.restore(&l)?;
            self.resumed_from = Some((l.manifest.step, l.location.clone()));
        }
        if let Some(layer) = d.layer {
            let position = d.target * self.cfg.batch_size;
            self.data.seek(position);
            let earlier = self.data.skipped().len();
            self.data.add_layer_skipping(position, layer.seed, layer.skip_at, layer.skip).map_err(|e| {
                Error::Ckpt(CkptError::Incompatible {
                    path: store.describe("rollback").into(),
                    reason: format!("cannot reshuffle the rest of the epoch: {e}"),
                })
            })?;
            if self.is_leader() {
                self.record_skipped(d.target, &self.data.skipped()[earlier..])?;
            }
        }
        if d.lr_until > d.target {
            self.lr_scale = Some((d.lr_scale, d.lr_until));
        }
        Ok(())
    }

    /// Appends the samples a rollback skips to `run_dir/skipped.jsonl` (`{"step", "epoch", "ids"}`): the data
    /// state lists an epoch's skipped samples only until the epoch ends, and this ledger keeps them for good.
    fn record_skipped(&self, step: u64, ids: &[u64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let path = self.cfg.run_dir.join("skipped.jsonl");
        let record = serde_json::json!({ "step": step, "epoch": self.data.epoch, "ids": ids });
        super::report::append_synced(&path, &record).map_err(io_err(&path))
    }

    fn restore(&mut self, l: &Loaded) -> Result<()> {
        let m = &l.manifest;
        let incompatible =
            |reason: String| Error::Ckpt(CkptError::Incompatible { path: l.location.clone().into(), reason });
        let fresh = "resume with the settings it was written with, or start a new run (another run_dir, or \
                     resume = \"never\")";
        if m.step > self.cfg.steps {
            return Err(incompatible(format!(
                "it is at step {}, past this run's last (train.steps = {}): raise train.steps to go on from it, or \
                 start a new run (another run_dir, or resume = \"never\")",
                m.step, self.cfg.steps
            )));
        }
        if m.model != self.cfg.model {
            return Err(incompatible(format!(
                "it holds another model ({}): {fresh}",
                differences(&m.model, &self.cfg.model, "model.")
            )));
        }
        if let Some(corpus) = m.train.get("corpus").and_then(|v| v.as_str()).filter(|&c| c != self.corpus) {
            return Err(incompatible(format!(
                "it was trained on another corpus (fingerprint {corpus}; data.path {} holds {}): {fresh}",
                self.cfg.data_path, self.corpus
            )));
        }
        if let Some(mb) = m.train.get("micro_batch").and_then(|v| v.as_u64()) {
            let chosen = m.train.get("micro_batch_auto").and_then(|v| v.as_bool()).unwrap_or(false);
            if self.cfg.micro_batch_auto && chosen {
                // The size an "auto" run came to is where this one starts (at most this world's share).
                let share = self.rank_share();
                self.micro_batch = mb.clamp(1, share);
                if self.is_leader() && self.micro_batch != share {
                    crate::say!(
                        "tessera: micro_batch {} as the checkpoint's run had chosen (\"auto\", out of {share})",
                        self.micro_batch
                    );
                }
            } else if mb != self.micro_batch {
                crate::say!(
                    "tessera: warning: the checkpoint was written with micro_batch {mb}, this run uses {}: the same \
                     mathematics, but losses will not match the original run bit for bit",
                    self.micro_batch
                );
            }
        }
        let leader = l.rank_file(0)?;
        let params =
            leader.get("params").ok_or_else(|| incompatible("rank 0's file has no parameters".into()))?.shallow_clone();
        if params.size() != self.model.params.flat.size() {
            return Err(incompatible(format!(
                "parameters {:?} do not fit this model's {:?}",
                params.size(),
                self.model.params.flat.size()
            )));
        }
        // The writers' layout, and the old files overlapping this rank's range of the flat buffer.
        let old = ShardLayout::new(m.zero_stage, 0, m.world_size, self.shard.numel);
        let (mine_start, mine_len) = (self.shard.start(), self.shard.len);
        let _guard = tch::no_grad_guard();
        self.model.params.flat.shallow_clone().copy_(&params);
        for name in ["exp_avg", "exp_avg_sq"] {
            let dst = if name == "exp_avg" { &self.opt.exp_avg } else { &self.opt.exp_avg_sq };
            // Zero first: the padding past the model's end is not in any file.
            let _ = dst.shallow_clone().zero_();
            let files = if m.zero_stage == 0 { 1 } else { m.world_size };
            for r in 0..files {
                let (start, len) = if m.zero_stage == 0 { (0, old.numel) } else { (r as i64 * old.len, old.len) };
                let lo = start.max(mine_start);
                let hi = (start + len).min(mine_start + mine_len).min(self.shard.numel);
                if lo >= hi {
                    continue;
                }
                let file = if r == 0 { &leader } else { &l.rank_file(r)? };
                let src = file.get(name).ok_or_else(|| incompatible(format!("no {name} in rank {r}'s file")))?;
                if src.size() != [len] {
                    return Err(incompatible(format!("rank {r}'s {name} is {:?}, expected [{len}]", src.size())));
                }
                dst.narrow(0, lo - mine_start, hi - lo).copy_(&src.narrow(0, lo - start, hi - lo));
            }
        }
        self.opt.step = m.step as i64;
        // The detector's state and a lowered learning rate, if the run that wrote it had them (older
        // checkpoints have neither: the detector then learns afresh).
        self.detector_state = m.detector.get("state").and_then(|v| serde_json::from_value(v.clone()).ok());
        self.lr_scale =
            m.detector.get("lr").and_then(|lr| Some((lr.get("scale")?.as_f64()?, lr.get("until")?.as_u64()?)));
        let data: crate::data::stream::DataState = serde_json::from_value(m.data_state.clone())
            .map_err(|e| incompatible(format!("data state does not parse: {e}")))?;
        data.check().map_err(|e| incompatible(format!("its data state is inconsistent: {e}")))?;
        if data.n != self.data.n {
            return Err(incompatible(format!(
                "its data stream has {} training samples an epoch, this run's corpus and settings give {} \
                 (data.path, data.eval_fraction or model.seq_len changed?): {fresh}",
                data.n, self.data.n
            )));
        }
        if (data.seed, data.block) != (self.data.seed, self.data.block) && self.is_leader() {
            crate::say!(
                "tessera: note: the data order continues as the checkpoint's run drew it (seed {}, block {}); this \
                 config's (seed {}, block {}) applies to new runs",
                data.seed,
                data.block,
                self.data.seed,
                self.data.block
            );
        }
        self.data = data;
        if Some(self.data.position) != m.step.checked_mul(self.cfg.batch_size) {
            return Err(incompatible(format!(
                "the data stream is at position {}, step {} of batch {} needs {} (the batch size changed?)",
                self.data.position,
                m.step,
                self.cfg.batch_size,
                m.step as u128 * self.cfg.batch_size as u128
            )));
        }
        Ok(())
    }

    /// The state this rank saves after `step` steps, copied to host memory so training can go on.
    ///
    /// The host buffers are allocated once (pinned on CUDA, so the copy is a fast DMA) and reused by every
    /// checkpoint: the caller waits for the previous write before the next snapshot, so no writer still
    /// reads them. A fresh allocation per checkpoint would pay the zero-fill and page faults every time.
    fn snapshot(&mut self) -> Vec<(String, Tensor)> {
        let mut live = vec![];
        if self.is_leader() {
            live.push(("params", self.model.params.flat.shallow_clone()));
        }
        if self.is_leader() || self.shard.zero > 0 {
            live.push(("exp_avg", self.opt.exp_avg.shallow_clone()));
            live.push(("exp_avg_sq", self.opt.exp_avg_sq.shallow_clone()));
        }
        let fits = self.host.len() == live.len()
            && self
                .host
                .iter()
                .zip(&live)
                .all(|((n, h), (m, t))| n == m && h.size() == t.size() && h.kind() == t.kind());
        if !fits {
            self.host = live
                .iter()
                .map(|(name, t)| {
                    let host = Tensor::empty(t.size(), (t.kind(), tch::Device::Cpu));
                    let host = match t.device() {
                        tch::Device::Cuda(_) => crate::shim::pin_memory(&host).unwrap_or(host),
                        _ => host,
                    };
                    (name.to_string(), host)
                })
                .collect();
        }
        let _guard = tch::no_grad_guard();
        for ((_, host), (_, t)) in self.host.iter_mut().zip(&live) {
            host.copy_(t);
        }
        self.host.iter().map(|(n, h)| (n.clone(), h.shallow_clone())).collect()
    }

    /// The step loop's checkpoint hook: waits for the previous checkpoint's write if one is still in flight,
    /// copies this rank's state to host memory, and hands it to the writer (with `async_write = false`, also
    /// waits for the commit). Returns the time the loop was blocked and the events that came in meanwhile.
    pub(super) fn checkpoint(&mut self, step: u64) -> Result<(Duration, Vec<CkptEvent>)> {
        let t0 = Instant::now();
        let leader = self.is_leader();
        let (world, rank) = (self.comm.world(), self.comm.rank());
        let manifest = leader.then(|| self.manifest_without_files(step));
        // At most one checkpoint in flight: the previous write must be done before its buffers are reused.
        let mut events = self.checkpointer()?.wait();
        let tensors = self.snapshot();
        // Every rank of this attempt derives the same stage name: same config, step and rollback count.
        let stage = self.store.stage_name(step, nonce(&manifest_nonce_seed(self, step)));
        let commit = manifest.map(|manifest| CommitJob {
            stage: stage.clone(),
            manifest,
            world,
            timeout: Duration::from_secs_f64(self.cfg.checkpoint.timeout_s),
        });
        let ckpt = self.checkpointer()?;
        ckpt.submit(SaveJob { step, stage, rank, tensors }, commit);
        if !self.cfg.checkpoint.async_write {
            events.extend(self.checkpointer()?.wait());
        }
        Ok((t0.elapsed(), events))
    }

    /// Whether the previous checkpoint is still being written on any rank (its file, or on the leader its
    /// commit) once it has had [`busy_wait`] since it was handed over (waiting for the rest of that, which is
    /// returned: the loop's stall); what it came to goes to `events`. A checkpoint that had its time already
    /// (one given up for it before) is not waited for again. Every rank asks at the same step and gets the
    /// same answer (a collective), so all take the next checkpoint or none does. Only with `async_write`: a
    /// synchronous write is never in flight.
    pub(super) fn checkpoint_in_flight(&mut self, events: &mut Vec<CkptEvent>) -> Result<(bool, Duration)> {
        let t0 = Instant::now();
        if !self.cfg.checkpoint.async_write {
            return Ok((false, Duration::ZERO));
        }
        let patience = busy_wait(self.cfg.checkpoint.timeout_s);
        let mine = match self.ckpt.as_mut() {
            Some(c) => {
                events.extend(c.poll());
                if let Some(age) = c.in_flight_for() {
                    events.extend(c.wait_for(patience.saturating_sub(age)));
                }
                c.in_flight()
            }
            None => false,
        };
        let any = self.every_ranks(i64::from(mine))?.contains(&1);
        Ok((any, t0.elapsed()))
    }

    fn manifest_without_files(&self, step: u64) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            step,
            tokens_seen: step * self.cfg.batch_size * self.cfg.model.seq_len as u64,
            world_size: self.comm.world(),
            zero_stage: self.shard.zero,
            model: self.cfg.model,
            train: serde_json::json!({
                "batch_size": self.cfg.batch_size,
                // The size in force (with "auto", what out of memory has left; a resumed run starts there).
                "micro_batch": self.micro_batch,
                "micro_batch_auto": self.cfg.micro_batch_auto,
                "accum_steps": self.comm.world() as u64 * self.rank_share().div_ceil(self.micro_batch),
                "schedule": self.cfg.schedule,
                // What the data stream's positions index into: a resume on other data is refused.
                "corpus": self.corpus,
            }),
            config_hash: self.cfg.hash(),
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            data_state: serde_json::to_value(&self.data).expect("data state serializes"),
            detector: self.detector_record(),
            files: vec![],
        }
    }

    /// What the manifest records of the spike detector: its view at this step (the rollback planner only
    /// rolls back to clean checkpoints), its state (a resumed run judges as the original would have), and a
    /// learning rate lowered after repeated spikes, if one is in force.
    fn detector_record(&self) -> serde_json::Value {
        let lr = self.lr_scale.map(|(scale, until)| serde_json::json!({"scale": scale, "until": until}));
        match self.spike.as_ref().and_then(|s| s.snapshot()) {
            // `clean` at the top, where `Manifest::is_clean` (retention, rollback targets) reads it.
            Some((tag, state)) => serde_json::json!({"clean": tag.clean, "view": tag, "state": state, "lr": lr}),
            None if lr.is_some() => serde_json::json!({"clean": null, "view": null, "state": null, "lr": lr}),
            None => serde_json::Value::Null,
        }
    }

    /// Waits for every checkpoint in flight to commit or fail (at the end of a run).
    pub(super) fn finish_checkpoints(&mut self) -> Vec<CkptEvent> {
        self.ckpt.as_mut().map(|c| c.wait()).unwrap_or_default()
    }

    /// Events from the writer since the last call, without waiting.
    pub(super) fn checkpoint_events(&mut self) -> Vec<CkptEvent> {
        self.ckpt.as_mut().map(|c| c.poll()).unwrap_or_default()
    }

    fn checkpointer(&mut self) -> Result<&mut crate::actors::ckpt_writer::Checkpointer> {
        if self.ckpt.is_none() {
            let c = crate::actors::ckpt_writer::Checkpointer::start(
                self.store.clone(),
                self.is_leader(),
                self.cfg.checkpoint.retention(),
            )
            .map_err(io_err(std::path::Path::new(&self.cfg.checkpoint.dir)))?;
            self.ckpt = Some(c);
        }
        Ok(self.ckpt.as_mut().expect("just started"))
    }
}

fn manifest_nonce_seed(t: &Trainer, step: u64) -> String {
    format!("{}/{step}/{}/{}", t.cfg.hash(), t.data.layers.len(), t.cfg.attempt)
}

fn nonce(seed: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(seed.as_bytes())
}

/// The fields in which two model shapes differ, as `model.n_layer 2 (checkpoint) / 3 (this run)`.
fn differences<T: Serialize>(checkpoint: &T, this_run: &T, prefix: &str) -> String {
    let (a, b) = (serde_json::to_value(checkpoint), serde_json::to_value(this_run));
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else {
        return "they differ".into();
    };
    let differ: Vec<String> = a
        .iter()
        .filter(|&(k, v)| b.get(k) != Some(v))
        .map(|(k, v)| {
            format!("{prefix}{k} {v} (checkpoint) / {} (this run)", b.get(k).unwrap_or(&serde_json::Value::Null))
        })
        .collect();
    if differ.is_empty() {
        "they differ".into()
    } else {
        differ.join(", ")
    }
}
