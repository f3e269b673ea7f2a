//! Checkpoints: the manifest that makes one trustworthy, where they are stored (disk or object store), the
//! retention policy, and the tools around them. The writer and coordinator actors build on these.
//!
//! # Layout on storage
//! ```text
//! <run>/checkpoints/                  (or checkpoint.dir: another directory, s3://…, gs://…, az://…)
//!   step-000001000/                     a committed checkpoint
//!     manifest.json                     written last; lists every other file with size and xxh3-64
//!     rank-00000.safetensors            each rank's shard (weights, its optimizer state)
//!     rank-00001.safetensors
//!   step-000002000/
//!   step-000003000.staging-9f3c0a1b2c3d4e5f/   a save in flight, or a crashed save's leftover
//!   latest                              "step-000002000\n": the checkpoint to resume from
//! ```
//! Names and the pointer's content are in [`manifest`] ([`manifest::checkpoint_name`],
//! [`manifest::staging_name`], [`manifest::format_latest`]).
//!
//! # Two-phase commit
//! 1. At a checkpoint step every rank copies its state to host memory and hands it to its checkpoint-writer
//!    actor ([`crate::actors::ckpt_writer`]); training goes on. All ranks of one attempt derive the same
//!    stage name from the config hash, the step and the rollback count, so no message is needed to agree.
//! 2. Each writer serializes its rank's file under the stage, makes it durable (fsync, or a completed
//!    upload), and votes by writing `.ack-rank-R.json` beside it with the file's size and xxh3-64 (or the
//!    error that stopped it).
//! 3. The leader's coordinator ([`crate::actors::ckpt_coordinator`]) waits for all votes. Any "no", or a
//!    deadline passing, abandons the stage. With every "yes" in it removes the votes, writes `manifest.json`
//!    last (fsynced) and publishes: a rename of the staging directory on a local disk, the manifest's single
//!    put on an object store. That is the commit point.
//! 4. It replaces `latest` atomically (write a temporary and rename, or one put), then applies
//!    [`retention::plan`].
//!
//! A crash at any point leaves either the old checkpoint or the new one, never a mixture: a checkpoint
//! counts as committed on any storage exactly when its manifest exists under its final name, and loaders
//! walk committed checkpoints newest first rather than trusting `latest`. On start, before any writer runs,
//! the leader removes every leftover ([`store::CkptStore::cleanup`]). Failpoints at each stage
//! ([`crate::chaos`]) let tests kill a real process there.
//!
//! # Loading
//! Parse and validate the manifest, check every file's size and checksum ([`manifest::Manifest::verify_digest`]),
//! and only then read tensors. Any failure marks that checkpoint corrupt or incompatible; `resume = "auto"`
//! falls back to the previous committed checkpoint, with a warning and a `skipped` line in the metrics.
//!
//! # Modules
//! - [`manifest`]: the manifest format, names, verification.
//! - [`retention`]: which checkpoints to keep (pure).
//! - [`store`]: local directories and object stores, the storage half of the commit, listing and loading.
//! - [`inspect`]: `tessera ckpt list` and `tessera ckpt verify`.
//! - [`export`]: a checkpoint as a Hugging Face GPT-2 directory.

pub mod export;
pub mod inspect;
pub mod manifest;
pub mod retention;
pub mod store;
