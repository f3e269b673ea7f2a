//! `tessera export`: a committed checkpoint as a model other tools load.
//!
//! Today one format, [`ExportFormat::Hf`]: a Hugging Face GPT-2 directory, `config.json` plus `model.safetensors`,
//! which `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads and runs with Tessera's logits (tested against
//! transformers in `tests/export.rs`). The model's tensors already carry GPT-2's names and shapes (see
//! [`crate::model::gpt`]), so the export is the checkpoint's flat parameter buffer cut into its named views by
//! the model's [`ParamLayout`]; the LM head is tied to `transformer.wte.weight` and is not written twice.
//!
//! `config.json` states everything Tessera's forward pass does, so transformers reproduces it rather than
//! falling back to its defaults: LayerNorm ε = 1e-5, the tanh GELU as libtorch computes it
//! (`gelu_pytorch_tanh`, the very kernel Tessera calls; GPT-2's `gelu_new` is the same formula written out in
//! Python and rounds differently), an MLP 4·d wide, no dropout, tied embeddings, fp32. The end-of-text id
//! (GPT-2's 50256, or 0 for the byte tokenizer) becomes `bos_token_id`/`eos_token_id` when the run's
//! `config.resolved.toml` beside the checkpoints says which tokenizer trained the model; otherwise they are
//! `null` rather than GPT-2's defaults, which would be wrong for a byte vocabulary.
//!
//! Every problem with the input (a path that is not there, no checkpoint that verifies, a manifest or state
//! file that does not describe a model, an output directory that is not empty) is an [`ExportError`] naming
//! it and the fix; nothing in here panics on what it reads.

use super::manifest::MANIFEST_FILE;
use super::store::{rank_file, CkptError, CkptStore, Loaded};
use crate::config::RunConfig;
use crate::data::Tokenizer;
use crate::model::gpt::param_specs;
use crate::model::{GptConfig, ParamLayout, Params};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Kind;

/// The file names of a Hugging Face model directory that the export writes.
pub const HF_CONFIG: &str = "config.json";
pub const HF_WEIGHTS: &str = "model.safetensors";

/// LayerNorm's ε in [`crate::model::Gpt`] (and GPT-2's).
const LAYER_NORM_EPS: f64 = 1e-5;

/// Elements copied out of the parameter buffer at a time while writing, so a large model is streamed to disk
/// rather than duplicated in memory (4 MiB of fp32).
const CHUNK: i64 = 1 << 20;

/// What `tessera export --format` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A Hugging Face GPT-2 directory: `config.json` and `model.safetensors` for `GPT2LMHeadModel`.
    Hf,
}

/// What to export, and where.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// A checkpoint directory (holding `manifest.json`), a run's `checkpoints` directory, or a run directory;
    /// the last two export the newest committed checkpoint that verifies.
    pub ckpt: PathBuf,
    pub format: ExportFormat,
    /// The output directory; created if missing.
    pub out: PathBuf,
    /// Write into `out` even if it is not empty (replacing `config.json` and `model.safetensors` there, and
    /// leaving any other file alone).
    pub force: bool,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The checkpoint exported.
    pub checkpoint: PathBuf,
    /// Its step.
    pub step: u64,
    pub model: GptConfig,
    /// Parameters written (the tied LM head counted once).
    pub n_params: i64,
    /// The end-of-text id written as `bos_token_id`/`eos_token_id`, if the tokenizer was known.
    pub eot_token: Option<u32>,
    /// The files written, in the order they were written.
    pub files: Vec<PathBuf>,
    /// Newer checkpoints passed over because they did not verify, each with the reason.
    pub skipped: Vec<String>,
}

/// Why an export could not be done. [`ExportError::exit_code`] tells the user's mistakes (2) from failures
/// while writing (1).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "{path} does not exist: pass a checkpoint directory (one holding manifest.json), a run's checkpoints \
         directory, or a run directory"
    )]
    NotFound { path: PathBuf },
    #[error(
        "{path} is not a directory: pass a checkpoint directory (one holding manifest.json), a run's checkpoints \
         directory, or a run directory"
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "no committed checkpoint that verifies in {searched}{}: pass a checkpoint directory, or a run directory \
         trained with `train.checkpoint_every` set",
        skipped_note(.skipped)
    )]
    NoCheckpoint { searched: PathBuf, skipped: Vec<String> },
    #[error(
        "checkpoint {path} does not verify: {}; pass an older checkpoint directory, or the run directory to \
         export the newest checkpoint that verifies",
        ckpt_reason(.source)
    )]
    Unverified { path: PathBuf, source: CkptError },
    #[error("checkpoint {path} cannot be exported: {reason}")]
    Incompatible { path: PathBuf, reason: String },
    #[error("--out {path} exists and is not a directory: choose another --out")]
    OutNotADirectory { path: PathBuf },
    #[error(
        "--out {path} is not empty: pass --force to replace its {HF_CONFIG} and {HF_WEIGHTS}, or choose an empty \
         or new directory"
    )]
    OutNotEmpty { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// A checkpoint error without the checkpoint's path, which the message around it already names.
fn ckpt_reason(e: &CkptError) -> String {
    match e {
        CkptError::Manifest { source, .. } => source.to_string(),
        CkptError::Incompatible { reason, .. } => reason.clone(),
        CkptError::Torch { source, .. } => format!("libtorch: {source}"),
        _ => e.to_string(),
    }
}

fn skipped_note(skipped: &[String]) -> String {
    match skipped {
        [] => String::new(),
        [one] => format!(" (1 checkpoint skipped: {one})"),
        [first, rest @ ..] => format!(" ({} checkpoints skipped; the newest: {first})", rest.len() + 1),
    }
}

impl ExportError {
    /// 2 for problems with the input (paths, checkpoints, the output directory), 1 for failures while writing.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExportError::Write { .. } => 1,
            _ => 2,
        }
    }
}

/// Exports the checkpoint `opts.ckpt` names into `opts.out`.
///
/// # Errors
/// [`ExportError`] naming the problem: a missing path, no checkpoint that verifies, a checkpoint whose
/// manifest or state file does not describe a model, an output directory that is not empty (without
/// `force`), or an I/O failure while writing.
pub fn export(opts: &ExportOptions) -> Result<Exported, ExportError> {
    let (loaded, skipped) = find(&opts.ckpt)?;
    let path = loaded.dir().to_path_buf();
    let incompatible = |reason: String| ExportError::Incompatible { path: path.clone(), reason };
    let model = loaded.manifest.model;
    model.validate().map_err(|e| incompatible(format!("the manifest's model shape is invalid: {e}")))?;
    let expected = model.n_params(); // a validated shape's count cannot overflow
    let leader = loaded.rank_file(0).map_err(|source| match source {
        CkptError::Torch { path: file, source } => ExportError::Incompatible {
            path: path.clone(),
            reason: format!("{} is not a readable safetensors file: {source}", file.display()),
        },
        source => ExportError::Unverified { path: path.clone(), source },
    })?;
    let Some(flat) = leader.get("params") else {
        let mut names: Vec<&str> = leader.keys().map(String::as_str).collect();
        names.sort_unstable();
        return Err(incompatible(format!(
            "rank 0's state file {} holds no `params` tensor (it holds {names:?}); only a checkpoint written by \
             `tessera train` or `tessera launch` has the model's parameters",
            rank_file(0)
        )));
    };
    if flat.kind() != Kind::Float || flat.size() != [expected] {
        return Err(incompatible(format!(
            "its parameters are {:?} of {:?}, but the manifest's model ({} layers, {} heads, d_model {}, context {}, \
             vocab {}) needs [{expected}] of Float",
            flat.size(),
            flat.kind(),
            model.n_layer,
            model.n_head,
            model.d_model,
            model.seq_len,
            model.vocab_size
        )));
    }
    let params = Params::from_flat(ParamLayout::new(param_specs(&model)), flat.shallow_clone());
    let eot_token = eot_token(&loaded);

    prepare_out(&opts.out, opts.force)?;
    let files = match opts.format {
        ExportFormat::Hf => write_hf(&opts.out, &model, &params, eot_token)?,
    };
    Ok(Exported { checkpoint: path, step: loaded.manifest.step, model, n_params: expected, eot_token, files, skipped })
}

/// Writes `model.safetensors`, then `config.json`, into `out`; returns their paths.
fn write_hf(
    out: &Path,
    model: &GptConfig,
    params: &Params,
    eot_token: Option<u32>,
) -> Result<Vec<PathBuf>, ExportError> {
    let weights = out.join(HF_WEIGHTS);
    write_atomically(&weights, |w| write_safetensors(w, params))?;
    let config = out.join(HF_CONFIG);
    let mut text = serde_json::to_string_pretty(&hf_config(model, eot_token)).expect("a JSON value serializes");
    text.push('\n');
    write_atomically(&config, |w| w.write_all(text.as_bytes()))?;
    Ok(vec![weights, config])
}

/// The checkpoint `path` names: itself if it holds a manifest, else the newest committed checkpoint that
/// verifies in it (a `checkpoints` directory) or in its `checkpoints` (a run directory).
fn find(path: &Path) -> Result<(Loaded, Vec<String>), ExportError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ExportError::NotFound { path: path.to_path_buf() })
        }
        Err(source) => {
            let source = CkptError::Io { path: path.to_path_buf(), source };
            return Err(ExportError::Unverified { path: path.to_path_buf(), source });
        }
        Ok(m) if !m.is_dir() => return Err(ExportError::NotADirectory { path: path.to_path_buf() }),
        Ok(_) => {}
    }
    if path.join(MANIFEST_FILE).exists() {
        let unverified = |source| ExportError::Unverified { path: path.to_path_buf(), source };
        let (parent, name) = match (path.parent(), path.file_name()) {
            (Some(p), Some(n)) => (p, n.to_string_lossy().into_owned()),
            _ => return Err(ExportError::NotADirectory { path: path.to_path_buf() }),
        };
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        let store = CkptStore::open(&parent.to_string_lossy(), &[]).map_err(unverified)?;
        return Ok((store.load(&name).map_err(unverified)?, vec![]));
    }
    let run_checkpoints = path.join("checkpoints");
    let root = if run_checkpoints.is_dir() { run_checkpoints } else { path.to_path_buf() };
    let mut skipped = vec![];
    let unverified = |source| ExportError::Unverified { path: root.clone(), source };
    let store = CkptStore::open(&root.to_string_lossy(), &[]).map_err(unverified)?;
    match store.newest(|e| skipped.push(e.to_string())).map_err(unverified)? {
        Some(loaded) => Ok((loaded, skipped)),
        None => Err(ExportError::NoCheckpoint { searched: root, skipped }),
    }
}

/// The end-of-text id of the tokenizer that trained this checkpoint, from the run's `config.resolved.toml`
/// (`<run>/checkpoints/<step>/` → `<run>/config.resolved.toml`) when it describes the same model.
fn eot_token(l: &Loaded) -> Option<u32> {
    let dir = std::fs::canonicalize(l.dir()).ok()?;
    let run_dir = dir.parent()?.parent()?;
    let text = std::fs::read_to_string(run_dir.join("config.resolved.toml")).ok()?;
    let cfg: RunConfig = toml::from_str(&text).ok()?;
    (cfg.model == l.manifest.model).then(|| Tokenizer::new(cfg.tokenizer).eot())
}

/// `config.json` for `GPT2LMHeadModel` with this shape, stating every setting Tessera's forward pass depends on.
fn hf_config(c: &GptConfig, eot: Option<u32>) -> serde_json::Value {
    json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.seq_len,
        "n_ctx": c.seq_len,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": 4 * c.d_model,
        "activation_function": "gelu_pytorch_tanh",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "add_cross_attention": false,
        "initializer_range": 0.02,
        "tie_word_embeddings": true,
        "use_cache": true,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": "float32",
        "torch_dtype": "float32",
    })
}

/// Creates `out` if needed; refuses a non-empty one unless `force`.
fn prepare_out(out: &Path, force: bool) -> Result<(), ExportError> {
    let write_err = |source| ExportError::Write { path: out.to_path_buf(), source };
    match std::fs::metadata(out) {
        Ok(m) if !m.is_dir() => Err(ExportError::OutNotADirectory { path: out.to_path_buf() }),
        Ok(_) => {
            let not_empty = std::fs::read_dir(out).map_err(write_err)?.next().is_some();
            if not_empty && !force {
                return Err(ExportError::OutNotEmpty { path: out.to_path_buf() });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(out).map_err(write_err),
        Err(source) => Err(write_err(source)),
    }
}

/// Writes `path` through a temporary beside it, fsynced and renamed into place, so an interrupted export never
/// leaves a partial file under the final name.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), ExportError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let result = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ExportError::Write { path: path.to_path_buf(), source }
    })
}

/// The model's named tensors as a safetensors file, in model order, with the `{"format": "pt"}` metadata
/// transformers looks for. Written by hand (the format is an 8-byte header length, a JSON header, the raw
/// little-endian data) because tch's writer cannot add metadata, and so the data streams out of the flat buffer
/// a chunk at a time.
fn write_safetensors(w: &mut impl Write, params: &Params) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut at = 0u64;
    for (name, t) in params.named() {
        let bytes = 4 * t.numel() as u64;
        header.insert(name.into(), json!({"dtype": "F32", "shape": t.size(), "data_offsets": [at, at + bytes]}));
        at += bytes;
    }
    let mut header = serde_json::to_vec(&header).expect("a JSON map serializes");
    // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    header.resize((8 + header.len()).div_ceil(8) * 8 - 8, b' ');
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    let mut values = vec![0f32; CHUNK as usize];
    let mut bytes = Vec::with_capacity(4 * CHUNK as usize);
    for (_, t) in params.named() {
        let t = t.detach().reshape([-1]);
        let n = t.size()[0];
        let mut start = 0;
        while start < n {
            let len = CHUNK.min(n - start);
            let part = t.narrow(0, start, len).contiguous();
            part.f_copy_data(&mut values, len as usize).map_err(std::io::Error::other)?;
            bytes.clear();
            bytes.extend(values[..len as usize].iter().flat_map(|v| v.to_le_bytes()));
            w.write_all(&bytes)?;
            start += len;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_without_a_known_tokenizer_gets_null_special_tokens() {
        let c = hf_config(&crate::model::preset("tiny").unwrap(), None);
        assert!(c["eos_token_id"].is_null() && c["bos_token_id"].is_null());
        assert_eq!(c["activation_function"], "gelu_pytorch_tanh");
    }
}
