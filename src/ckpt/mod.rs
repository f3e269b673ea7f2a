//! Checkpoints: the manifest that makes one trustworthy, the names on storage, and the retention policy.
//! These are the pure foundations; the checkpoint writer actor and the loader build on them.
//!
//! # Layout on storage
//! ```text
//! <run>/checkpoints/
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
//! 1. The coordinator picks the step and a fresh random nonce, and tells every rank the staging name.
//! 2. Each rank writes its shards under the staging name, fsyncs them, and acknowledges with each file's
//!    name, size and xxh3-64. A rank that fails or misses the deadline aborts the save; the staging directory
//!    is abandoned and training goes on from the previous checkpoint's guarantees.
//! 3. With every acknowledgement in, the coordinator builds the [`manifest::Manifest`] from them,
//!    validates it, and writes `manifest.json` last, fsynced.
//! 4. It renames the staging directory to its final name (and fsyncs the parent): the commit point.
//! 5. It replaces `latest` atomically (write a temporary, rename), then applies [`retention::plan`].
//!
//! A crash at any point leaves either the old checkpoint or the new one as what `latest` names, never a
//! mixture. Object stores cannot rename a prefix; there the manifest's single atomic put is the commit point,
//! which is why a checkpoint counts as *committed* on any storage only if its manifest exists (see
//! [`retention::CheckpointInfo::committed`]). On start, before any writer runs, staging leftovers and
//! uncommitted checkpoint directories are deleted.
//!
//! # Loading
//! Read `latest`, parse and validate the manifest, and check every file against it
//! ([`manifest::Manifest::verify_file`]). Any [`manifest::ManifestError`] marks that checkpoint corrupt or
//! incompatible, and the loader falls back to the previous committed checkpoint.
//!
//! # Modules
//! - [`manifest`]: the manifest format, names, verification.
//! - [`retention`]: which checkpoints to keep (pure).
//! - [`local`]: synchronous save and load on a local filesystem (today's writer; the loader walks committed
//!   checkpoints newest first rather than trusting `latest`).

pub mod local;
pub mod manifest;
pub mod retention;
