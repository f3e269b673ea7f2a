//! Model shapes: the named presets, exact parameter counts and FLOPs per token.
//!
//! The `gpt-*` presets are MosaicML's GPT series (the `mosaic_gpt` yamls of their LLM examples): every one has
//! a 2048-token context and a head dimension of 128 from 760M up (MosaicML changed the head counts of 760M
//! and 2.7B for FlashAttention). The vocabulary is GPT-2's 50,257 tokens padded to 50,304, a multiple of 128,
//! as in nanoGPT and the PyTorch baseline (`../shared/bench/pt_baseline.py`); a byte-level corpus uses 256.

use serde::{Deserialize, Serialize};

/// GPT-2's vocabulary (50,257) rounded up to a multiple of 128 so the LM-head matmul tiles evenly.
pub const GPT2_PADDED_VOCAB: i64 = 50_304;

/// The shape of a GPT-2 style decoder. All fields are plain numbers; [`GptConfig::validate`] says what is
/// rejected and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Number of transformer blocks.
    pub n_layer: i64,
    /// Number of attention heads; `d_model` must divide evenly by it.
    pub n_head: i64,
    /// Width of the residual stream. The MLP is `4 * d_model` wide.
    pub d_model: i64,
    /// Context length: the number of learned position embeddings and the longest sequence trained on.
    pub seq_len: i64,
    /// Rows of the (tied) token embedding.
    pub vocab_size: i64,
}

/// The largest shapes [`GptConfig::validate`] accepts: far beyond any preset, and small enough that parameter
/// and FLOP counts cannot overflow (the largest model they allow has about 10^15 parameters).
pub const MAX_LAYERS: i64 = 1 << 12;
/// Largest `d_model` (and `n_head`).
pub const MAX_WIDTH: i64 = 1 << 17;
/// Largest context length.
pub const MAX_CONTEXT: i64 = 1 << 20;
/// Largest vocabulary (tokens are stored as `u32`; 2^24 is 64 times GPT-4's).
pub const MAX_VOCAB: i64 = 1 << 24;

/// A named model shape. `seq_len` and `vocab_size` are the preset's defaults; a run may shorten the context
/// or size the vocabulary to its tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub config: GptConfig,
    pub note: &'static str,
}

const fn gpt(n_layer: i64, n_head: i64, d_model: i64, seq_len: i64, vocab_size: i64) -> GptConfig {
    GptConfig { n_layer, n_head, d_model, seq_len, vocab_size }
}

/// Every preset, smallest first. The tiny ones exist for tests and the CPU demo.
pub const PRESETS: &[Preset] = &[
    Preset { name: "tiny", config: gpt(2, 4, 64, 64, 256), note: "tests: byte vocabulary" },
    Preset { name: "mini", config: gpt(4, 4, 128, 128, 256), note: "the CPU demo: byte vocabulary" },
    Preset { name: "gpt-125m", config: gpt(12, 12, 768, 2048, GPT2_PADDED_VOCAB), note: "GPT-3 Small" },
    Preset { name: "gpt-350m", config: gpt(24, 16, 1024, 2048, GPT2_PADDED_VOCAB), note: "GPT-3 Medium" },
    Preset {
        name: "gpt-760m",
        config: gpt(24, 12, 1536, 2048, GPT2_PADDED_VOCAB),
        note: "GPT-3 Large; 12 heads so d_head = 128",
    },
    Preset { name: "gpt-1.3b", config: gpt(24, 16, 2048, 2048, GPT2_PADDED_VOCAB), note: "GPT-3 XL" },
    Preset {
        name: "gpt-2.7b",
        config: gpt(32, 20, 2560, 2048, GPT2_PADDED_VOCAB),
        note: "GPT-3 2.7B; 20 heads so d_head = 128",
    },
    Preset { name: "gpt-6.7b", config: gpt(32, 32, 4096, 2048, GPT2_PADDED_VOCAB), note: "GPT-3 6.7B" },
    Preset { name: "gpt-13b", config: gpt(40, 40, 5120, 2048, GPT2_PADDED_VOCAB), note: "GPT-3 13B" },
    Preset { name: "gpt-30b", config: gpt(48, 56, 7168, 2048, GPT2_PADDED_VOCAB), note: "MosaicML 30B" },
    Preset {
        name: "gpt-70b",
        config: gpt(80, 64, 8192, 2048, GPT2_PADDED_VOCAB),
        note: "MosaicML 70B (65B parameters at this shape)",
    },
];

/// Looks a preset up by name.
pub fn preset(name: &str) -> Option<GptConfig> {
    PRESETS.iter().find(|p| p.name == name).map(|p| p.config)
}

/// The preset names, for error messages.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

impl GptConfig {
    /// Checks that the shape can be built.
    ///
    /// # Errors
    /// A message naming the field and the constraint it breaks.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v, max) in [
            ("n_layer", self.n_layer, MAX_LAYERS),
            ("n_head", self.n_head, MAX_WIDTH),
            ("d_model", self.d_model, MAX_WIDTH),
            ("seq_len", self.seq_len, MAX_CONTEXT),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
        ] {
            if v <= 0 {
                return Err(format!("model.{name} must be positive, got {v}"));
            }
            if v > max {
                return Err(format!("model.{name} {v} is larger than Tessera builds (at most {max})"));
            }
        }
        if self.d_model % self.n_head != 0 {
            return Err(format!(
                "model.d_model ({}) must be divisible by model.n_head ({}): each head gets d_model / n_head channels",
                self.d_model, self.n_head
            ));
        }
        Ok(())
    }

    /// Exact number of trainable parameters, counting the tied embedding once:
    /// `V·d + T·d + L·(12·d² + 13·d) + 2·d`.
    pub fn n_params(&self) -> i64 {
        let d = self.d_model;
        self.vocab_size * d + self.seq_len * d + self.n_layer * (12 * d * d + 13 * d) + 2 * d
    }

    /// Parameters that take part in matmuls: all but the position embedding (a lookup, no FLOPs).
    /// The tied token embedding counts, since it is the LM head's weight.
    pub fn n_params_compute(&self) -> i64 {
        self.n_params() - self.seq_len * self.d_model
    }

    /// Training FLOPs per token (forward and backward) at context length `seq_len`:
    /// `6·N + 12·L·d·T`, the second term being attention's score and value matmuls (PaLM appendix B,
    /// counting the full, not the causal half, T×T matrix; the same formula as the PyTorch baseline).
    pub fn flops_per_token(&self, seq_len: i64) -> f64 {
        6.0 * self.n_params_compute() as f64 + 12.0 * (self.n_layer * self.d_model) as f64 * seq_len as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt_125m_has_gpt2_small_parameter_count() {
        // GPT-2 small with a 1024 context and vocabulary 50,257 has 124,439,808 parameters (tied).
        let c = GptConfig { seq_len: 1024, vocab_size: 50_257, ..preset("gpt-125m").unwrap() };
        assert_eq!(c.n_params(), 124_439_808);
    }

    #[test]
    fn every_preset_is_valid_and_ordered_by_size() {
        let mut last = 0;
        for p in PRESETS {
            p.config.validate().unwrap();
            assert!(p.config.n_params() > last, "{} is not larger than the preset before it", p.name);
            last = p.config.n_params();
        }
    }

    #[test]
    fn flops_per_token_matches_the_baseline_formula() {
        // pt_baseline.py: 6 * (n - T*D) + 12*L*D*T for 125m at T = 1024.
        let c = GptConfig { seq_len: 1024, ..preset("gpt-125m").unwrap() };
        let n = c.n_params();
        let expected = 6 * (n - 1024 * 768) + 12 * 12 * 768 * 1024;
        assert_eq!(c.flops_per_token(1024), expected as f64);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let c = GptConfig { n_head: 5, ..preset("tiny").unwrap() };
        assert!(c.validate().unwrap_err().contains("n_head"));
        let c = GptConfig { n_layer: 0, ..preset("tiny").unwrap() };
        assert!(c.validate().unwrap_err().contains("model.n_layer"));
    }

    #[test]
    fn shapes_too_large_to_count_are_refused_before_anything_multiplies_them() {
        // 12·d² at d = 2^32 overflows i64: the count used to panic.
        let c = GptConfig { d_model: 1 << 32, n_head: 1, ..preset("tiny").unwrap() };
        assert!(c.validate().unwrap_err().contains("model.d_model 4294967296 is larger"));
        let largest = GptConfig {
            n_layer: MAX_LAYERS,
            n_head: 1,
            d_model: MAX_WIDTH,
            seq_len: MAX_CONTEXT,
            vocab_size: MAX_VOCAB,
        };
        largest.validate().unwrap();
        assert!(largest.n_params() > 0 && largest.flops_per_token(MAX_CONTEXT).is_finite());
    }
}
