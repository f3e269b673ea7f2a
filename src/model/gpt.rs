//! The GPT: a GPT-2 style decoder, written as pure tensor code.
//!
//! Pre-LayerNorm blocks, causal self-attention through libtorch's scaled-dot-product attention (FlashAttention
//! on CUDA), a tanh-GELU MLP of width `4·d`, learned position embeddings, and an LM head tied to the token
//! embedding. Matmul weights are stored `(in, out)` like Hugging Face's `Conv1D`, so every tensor has exactly
//! the shape and name it has in a Hugging Face GPT-2 checkpoint and export is a renaming.
//!
//! Shapes in comments: B batch, T time, C = d_model, nh heads, hs = C / nh, V vocabulary.

use super::config::GptConfig;
use super::params::{Init, ParamLayout, ParamSpec, Params};
use crate::shim::Recomputable;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{Device, Kind, TchError, Tensor};

/// A linear layer's weight and bias in `Conv1D` layout: `y = x @ w + b`, `w: (in, out)`.
struct Linear {
    w: Tensor,
    b: Tensor,
    /// The weight's bf16 copy ([`Gpt::set_bf16_weights`]), used instead of `w` while `bf16` is set.
    w16: Option<Tensor>,
    bf16: Arc<AtomicBool>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let (d_in, d_out) = (self.w.size()[0], self.w.size()[1]);
        let mut shape = x.size();
        *shape.last_mut().unwrap() = d_out;
        let w = match &self.w16 {
            Some(w16) if self.bf16.load(Ordering::Relaxed) => w16,
            _ => &self.w,
        };
        // (N, in) @ (in, out) + (out) in one addmm, as torch.nn.functional.linear does.
        self.b.f_addmm(&x.f_reshape([-1, d_in])?, w)?.f_view(shape.as_slice())
    }
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

const LN_EPS: f64 = 1e-5;

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let d = *x.size().last().unwrap();
        x.f_layer_norm([d], Some(&self.w), Some(&self.b), LN_EPS, true)
    }

    /// `(x + y, self(x + y))`: through Tessera's fused kernel where it applies (the fp32 residual stream plus a
    /// bf16 sublayer output, on CUDA), else libtorch's add and LayerNorm.
    fn add_forward(&self, x: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        if x.device().is_cuda() && x.kind() == Kind::Float && y.kind() == Kind::BFloat16 {
            return crate::shim::add_layer_norm(x, y, &self.w, &self.b, LN_EPS);
        }
        let s = x.f_add(y)?;
        let h = self.forward(&s)?;
        Ok((s, h))
    }
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: i64,
}

impl Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let (b, t, c) = x.size3()?;
        let hs = c / self.n_head;
        let qkv = self.c_attn.forward(x)?; // (B, T, 3C)
        let qkv = qkv.f_view([b, t, 3, self.n_head, hs])?.f_permute([2, 0, 3, 1, 4])?; // (3, B, nh, T, hs)

        // `unbind`, not three `select`s: its backward stacks the three gradients in one pass, where each
        // select's would write a zeroed copy of the whole qkv gradient (8 ms a step at 1.3B on an H100).
        let [q, k, v]: [Tensor; 3] = qkv.f_unbind(0)?.try_into().expect("three slices"); // each (B, nh, T, hs)
        let y = Tensor::f_scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false)?;
        let y = y.f_transpose(1, 2)?.f_reshape([b, t, c])?; // (B, T, C)
        self.c_proj.forward(&y)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        self.c_proj.forward(&self.c_fc.forward(x)?.f_gelu("tanh")?) // (B, T, 4C) -> (B, T, C)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Recomputable for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let x = x.f_add(&self.attn.forward(&self.ln_1.forward(x)?)?)?;
        x.f_add(&self.mlp.forward(&self.ln_2.forward(&x)?)?)
    }
}

/// The model. It holds views into its [`Params`]; gradients land on those views.
pub struct Gpt {
    pub config: GptConfig,
    pub params: Params,
    wte: Tensor,
    wpe: Tensor,
    h: Vec<Arc<Block>>,
    ln_f: LayerNorm,
    /// Compute the loss with the shim's cross-entropy, whose backward stays in the logits' dtype (bf16 on
    /// CUDA) instead of PyTorch's fp32 round trip; the loss itself is fp32 either way. Default on.
    pub fused_cross_entropy: bool,
    /// With [`Gpt::fused_cross_entropy`] on bf16 CUDA logits: Tessera's own cross-entropy kernels
    /// (`csrc/cross_entropy.cu`, two passes over the logits where libtorch's ops take about seven) instead of
    /// libtorch's ops. Default off: `tessera bench --ce-kernel` measures it, `tessera doctor` checks it.
    pub ce_kernel: bool,
    /// Fuse each residual add into the LayerNorm after it, through Tessera's own kernels on CUDA
    /// (`csrc/layer_norm.cu`): about half the passes over the residual stream. Not with
    /// [`Gpt::recompute`] (the blocks are recomputed whole). Off CUDA the same ops run as without it. Default
    /// off: `tessera bench --ln-kernel` measures it, `tessera doctor` checks it.
    pub ln_kernel: bool,
    /// Recompute each block's activations in backward instead of keeping them (`train.recompute`): a block
    /// keeps only its input, for about one more forward pass of compute. The same results.
    pub recompute: bool,
    /// Whether the matmuls use the weights' bf16 copies ([`Gpt::set_bf16_weights`]) in this step.
    bf16_in_use: Arc<AtomicBool>,
}

/// The named tensors of a GPT with this shape, in Hugging Face GPT-2 order, with GPT-2's initialisation:
/// std 0.02 everywhere, residual projections (`attn.c_proj`, `mlp.c_proj`) scaled by `1/sqrt(2·n_layer)`.
pub fn param_specs(c: &GptConfig) -> Vec<ParamSpec> {
    let d = c.d_model;
    let std = 0.02;
    let proj_std = 0.02 / ((2 * c.n_layer) as f64).sqrt();
    let spec = |name: String, shape: Vec<i64>, decay: bool, init: Init| ParamSpec { name, shape, decay, init };
    let mut specs = vec![
        spec("transformer.wte.weight".into(), vec![c.vocab_size, d], false, Init::Normal(std)),
        spec("transformer.wpe.weight".into(), vec![c.seq_len, d], false, Init::Normal(std)),
    ];
    for i in 0..c.n_layer {
        let p = format!("transformer.h.{i}");
        specs.extend([
            spec(format!("{p}.ln_1.weight"), vec![d], false, Init::Ones),
            spec(format!("{p}.ln_1.bias"), vec![d], false, Init::Zeros),
            spec(format!("{p}.attn.c_attn.weight"), vec![d, 3 * d], true, Init::Normal(std)),
            spec(format!("{p}.attn.c_attn.bias"), vec![3 * d], false, Init::Zeros),
            spec(format!("{p}.attn.c_proj.weight"), vec![d, d], true, Init::Normal(proj_std)),
            spec(format!("{p}.attn.c_proj.bias"), vec![d], false, Init::Zeros),
            spec(format!("{p}.ln_2.weight"), vec![d], false, Init::Ones),
            spec(format!("{p}.ln_2.bias"), vec![d], false, Init::Zeros),
            spec(format!("{p}.mlp.c_fc.weight"), vec![d, 4 * d], true, Init::Normal(std)),
            spec(format!("{p}.mlp.c_fc.bias"), vec![4 * d], false, Init::Zeros),
            spec(format!("{p}.mlp.c_proj.weight"), vec![4 * d, d], true, Init::Normal(proj_std)),
            spec(format!("{p}.mlp.c_proj.bias"), vec![d], false, Init::Zeros),
        ]);
    }
    specs.push(spec("transformer.ln_f.weight".into(), vec![d], false, Init::Ones));
    specs.push(spec("transformer.ln_f.bias".into(), vec![d], false, Init::Zeros));
    specs
}

impl Gpt {
    /// A freshly initialised model on `device`; the same seed gives the same weights.
    pub fn new(config: GptConfig, device: Device, seed: u64) -> Self {
        let params = Params::init(ParamLayout::new(param_specs(&config)), device, seed);
        Self::from_params(config, params)
    }

    /// A model over existing parameters (for example loaded from a checkpoint).
    ///
    /// # Panics
    /// If `params` was not laid out for `config` (a programming error: loaders build the layout from the
    /// same config).
    pub fn from_params(config: GptConfig, params: Params) -> Self {
        assert_eq!(params.layout.specs, param_specs(&config), "parameters were laid out for another shape");
        let bf16_in_use = Arc::new(AtomicBool::new(false));
        let h = blocks(&config, &params, &bf16_in_use);
        let p = |name: String| params.get(&name).expect("spec exists");
        let ln = |prefix: &str| LayerNorm { w: p(format!("{prefix}.weight")), b: p(format!("{prefix}.bias")) };
        Gpt {
            wte: p("transformer.wte.weight".into()),
            wpe: p("transformer.wpe.weight".into()),
            ln_f: ln("transformer.ln_f"),
            h,
            config,
            params,
            fused_cross_entropy: true,
            ce_kernel: false,
            ln_kernel: false,
            recompute: false,
            bf16_in_use,
        }
    }

    /// Keeps bf16 copies of the matmul weights ([`Params::enable_shadow`]) for steps that run under bf16
    /// autocast ([`Gpt::use_bf16_weights`]; not while the all-reduce overlaps backward through hooks on the
    /// fp32 weights, as the TCP ring's does at ZeRO 0 and 1): the matmuls read the copies
    /// instead of casting the fp32 weights each step, and Tessera's AdamW kernel writes the copies as it
    /// updates the weights. The same values either way: autocast's casts are the same roundings (and, with
    /// `d_model` a multiple of 16, as every preset's, the copies are as aligned as a fresh cast, so cuBLAS
    /// picks the same kernels and the results are the same bits). Off (the default), the copies are dropped.
    pub fn set_bf16_weights(&mut self, on: bool) {
        if on == self.bf16_weights() {
            return; // the blocks already read what they should
        }
        if on {
            self.params.enable_shadow();
        } else {
            self.params.disable_shadow();
            self.bf16_in_use.store(false, Ordering::Relaxed);
        }
        self.h = blocks(&self.config, &self.params, &self.bf16_in_use);
    }

    /// Whether this model keeps bf16 weight copies ([`Gpt::set_bf16_weights`]).
    pub fn bf16_weights(&self) -> bool {
        self.params.has_shadow()
    }

    /// Makes the next forward passes read the bf16 weight copies (made current first, if an update through
    /// libtorch or a load changed the weights since), or the fp32 weights. Returns whether it will read the
    /// copies: only if the model keeps them.
    pub fn use_bf16_weights(&mut self, on: bool) -> bool {
        let on = on && self.bf16_weights();
        if on {
            self.params.refresh_shadow();
        }
        self.bf16_in_use.store(on, Ordering::Relaxed);
        on
    }
}

/// The blocks over `params`, with the matmul weights' bf16 copies where `params` keeps them.
fn blocks(config: &GptConfig, params: &Params, bf16: &Arc<AtomicBool>) -> Vec<Arc<Block>> {
    let p = |name: String| params.get(&name).expect("spec exists");
    let lin = |prefix: &str| {
        let name = format!("{prefix}.weight");
        let w16 = params.layout.index_of(&name).and_then(|i| params.shadow_view(i));
        Linear { w: p(name), b: p(format!("{prefix}.bias")), w16, bf16: bf16.clone() }
    };
    let ln = |prefix: &str| LayerNorm { w: p(format!("{prefix}.weight")), b: p(format!("{prefix}.bias")) };
    (0..config.n_layer)
        .map(|i| {
            let b = format!("transformer.h.{i}");
            // An `Arc` for its atomic count: a graph that recomputes the block holds it, and may let it go
            // on libtorch's autograd thread.
            #[allow(clippy::arc_with_non_send_sync)]
            Arc::new(Block {
                ln_1: ln(&format!("{b}.ln_1")),
                attn: Attention {
                    c_attn: lin(&format!("{b}.attn.c_attn")),
                    c_proj: lin(&format!("{b}.attn.c_proj")),
                    n_head: config.n_head,
                },
                ln_2: ln(&format!("{b}.ln_2")),
                mlp: Mlp { c_fc: lin(&format!("{b}.mlp.c_fc")), c_proj: lin(&format!("{b}.mlp.c_proj")) },
            })
        })
        .collect()
}

impl Gpt {
    /// Logits for every position: `idx (B, T) int64 -> (B, T, V)`. `T` may be shorter than `seq_len`.
    ///
    /// # Errors
    /// libtorch's, for example CUDA out of memory (recoverable: free memory and retry smaller).
    pub fn f_forward(&self, idx: &Tensor) -> Result<Tensor, TchError> {
        let (_, t) = idx.size2()?;
        let pos = Tensor::f_arange(t, (Kind::Int64, idx.device()))?; // (T)
        let mut x = embed(&self.wte, idx)?.f_add(&embed(&self.wpe, &pos)?)?; // (B, T, C)
        let h = if self.ln_kernel && !self.recompute {
            self.fused_blocks(x)?
        } else {
            for block in &self.h {
                x = if self.recompute { crate::shim::recompute(block, &x)? } else { block.forward(&x)? };
            }
            self.ln_f.forward(&x)?
        };
        h.f_matmul(&self.wte.f_tr()?) // (B, T, C) @ (C, V) -> (B, T, V), the tied LM head
    }

    /// The blocks and `ln_f` with each residual add fused into the LayerNorm after it
    /// ([`Gpt::ln_kernel`]), across block boundaries: `x (B, T, C) -> ln_f(blocks(x))`. The same ops in the
    /// same order as [`Block::forward`] in a loop, so where the kernel does not apply the bits are the same.
    fn fused_blocks(&self, mut x: Tensor) -> Result<Tensor, TchError> {
        let Some(first) = self.h.first() else { return self.ln_f.forward(&x) };
        let mut h = first.ln_1.forward(&x)?;
        for (i, block) in self.h.iter().enumerate() {
            let (s, h2) = block.ln_2.add_forward(&x, &block.attn.forward(&h)?)?; // x + attn, ln_2 of it
            let next = self.h.get(i + 1).map_or(&self.ln_f, |b| &b.ln_1);
            (x, h) = next.add_forward(&s, &block.mlp.forward(&h2)?)?; // s + mlp, the next LayerNorm of it
        }
        Ok(h)
    }

    /// [`Gpt::f_forward`], panicking on libtorch errors (for tests and tools, never the training loop).
    pub fn forward(&self, idx: &Tensor) -> Tensor {
        self.f_forward(idx).expect("forward pass")
    }

    /// Mean next-token cross-entropy, always computed in fp32: `idx, targets (B, T) -> ()`.
    ///
    /// # Errors
    /// As [`Gpt::f_forward`].
    pub fn f_loss(&self, idx: &Tensor, targets: &Tensor) -> Result<Tensor, TchError> {
        let logits = self.f_forward(idx)?;
        let v = *logits.size().last().unwrap();
        let (logits, targets) = (logits.f_reshape([-1, v])?, targets.f_reshape([-1])?); // (B·T, V), (B·T)
        if self.fused_cross_entropy {
            crate::shim::cross_entropy(&logits, &targets, self.ce_kernel)
        } else {
            logits.f_to_kind(Kind::Float)?.f_cross_entropy_loss::<Tensor>(
                &targets,
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
        }
    }

    /// [`Gpt::f_loss`], panicking on libtorch errors (for tests and tools, never the training loop).
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Tensor {
        self.f_loss(idx, targets).expect("loss")
    }
}

/// Row lookup: `w (N, C)`, `idx (...)` -> `(..., C)`.
fn embed(w: &Tensor, idx: &Tensor) -> Result<Tensor, TchError> {
    Tensor::f_embedding(w, idx, -1, false, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::preset;

    #[test]
    fn the_fused_residual_loop_gives_the_bits_of_the_block_loop_where_the_kernel_does_not_apply() {
        let config = preset("tiny").unwrap();
        let (idx, targets) = {
            // Not held below: initialising a model takes the lock itself.
            let _g = crate::model::params::RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            tch::manual_seed(9);
            let rand = || Tensor::randint(config.vocab_size, [3, 16], (Kind::Int64, Device::Cpu));
            (rand(), rand())
        };
        let run = |fused: bool| {
            let mut model = Gpt::new(config, Device::Cpu, 4);
            model.ln_kernel = fused;
            let loss = model.loss(&idx, &targets);
            loss.backward();
            let grads: Vec<Tensor> = model.params.named().map(|(_, t)| t.grad()).collect();
            (loss.double_value(&[]), grads)
        };
        let ((l0, g0), (l1, g1)) = (run(false), run(true));
        assert_eq!(l0.to_bits(), l1.to_bits());
        assert_eq!(g0.len(), g1.len());
        for (a, b) in g0.iter().zip(&g1) {
            assert!(a.defined() && a.equal(b));
        }
    }

    #[test]
    fn bf16_weight_copies_are_the_matmul_weights_rounded_and_are_made_again_only_after_the_weights_change() {
        let mut model = Gpt::new(preset("tiny").unwrap(), Device::Cpu, 4);
        model.set_bf16_weights(true);
        let len = model.params.layout.decay_len;
        let rounded = |m: &Gpt| m.params.flat.narrow(0, 0, len).to_kind(Kind::BFloat16);
        let copies = model.params.shadow_flat().unwrap();
        assert!(copies.equal(&rounded(&model)));
        for (i, spec) in model.params.layout.specs.iter().enumerate() {
            let view = model.params.shadow_view(i);
            assert_eq!(view.is_some(), spec.decay, "{}", spec.name);
            if let Some(v) = view {
                assert_eq!((v.size(), v.kind(), v.requires_grad()), (spec.shape.clone(), Kind::BFloat16, true));
            }
        }
        assert!(!model.params.refresh_shadow(), "current copies are not made again");
        // An in-place change of the weights (an update through libtorch, a checkpoint load) makes them stale.
        tch::no_grad(|| {
            let _ = model.params.flat.narrow(0, 0, 10).g_add_scalar_(1.0);
        });
        assert!(model.params.refresh_shadow());
        assert!(copies.equal(&rounded(&model)), "made again from the changed weights");
        assert!(!model.params.refresh_shadow());
        // Off the GPU the step never reads them; off, they are gone.
        assert!(!model.use_bf16_weights(false));
        model.set_bf16_weights(false);
        assert!(model.params.shadow_flat().is_none() && !model.use_bf16_weights(true));
    }

    #[test]
    fn a_bf16_copys_gradient_is_the_piece_the_optimizer_reads_and_zero_grad_drops_it() {
        let mut model = Gpt::new(preset("tiny").unwrap(), Device::Cpu, 4);
        model.set_bf16_weights(true);
        let i = model.params.layout.index_of("transformer.h.0.mlp.c_fc.weight").unwrap();
        let w16 = model.params.shadow_view(i).unwrap();
        (w16.to_kind(Kind::Float) * 2.0).sum(Kind::Float).backward();
        let piece =
            model.params.grad_pieces().into_iter().find(|p| p.offset == model.params.layout.offsets[i]).unwrap();
        assert_eq!(piece.grad.kind(), Kind::BFloat16);
        assert!(piece.grad.equal(&Tensor::full([w16.numel() as i64], 2.0, (Kind::BFloat16, Device::Cpu))));
        model.params.zero_grad();
        assert!(!w16.grad().defined());
    }

    #[test]
    fn an_update_through_libtorch_leaves_the_copies_stale_and_they_are_made_again_before_use() {
        for fused in [true, false] {
            let mut model = Gpt::new(preset("tiny").unwrap(), Device::Cpu, 4);
            model.set_bf16_weights(true);
            let mut opt = crate::model::AdamW::new(Default::default(), &model.params.flat);
            opt.fused = fused;
            let (len, n) = (model.params.layout.decay_len, model.params.layout.numel);
            let grad = Tensor::full([n], 0.5, (Kind::Float, Device::Cpu));
            let whole = [crate::model::optim::GradPiece { offset: 0, grad }];
            let copies = model.params.shadow_flat();
            let written = opt.update_pieces_with_copies(&model.params.flat, &whole, len, 1e-2, None, copies.as_ref());
            assert!(!written && opt.fused == fused, "libtorch's update (fused: {fused}) does not write the copies");
            assert!(model.use_bf16_weights(true), "the copies are read");
            let rounded = model.params.flat.narrow(0, 0, len).to_kind(Kind::BFloat16);
            assert!(copies.unwrap().equal(&rounded), "fused: {fused}: the copies were not made again");
            assert!(!model.params.refresh_shadow());
        }
    }

    #[test]
    fn micro_batches_add_up_a_copys_gradients_in_fp32_not_in_bf16() {
        let mut model = Gpt::new(preset("tiny").unwrap(), Device::Cpu, 4);
        model.set_bf16_weights(true);
        let i = model.params.layout.index_of("transformer.h.1.attn.c_proj.weight").unwrap();
        let (w, w16) = (model.params.view(i), model.params.shadow_view(i).unwrap());
        let n = w16.numel() as i64;
        // The first micro-batch's gradient, 1 everywhere, folded into the fp32 weight's as the step does
        // between micro-batches.
        w16.to_kind(Kind::Float).sum(Kind::Float).backward();
        model.params.fold_copy_grads().unwrap();
        assert!(!w16.grad().defined(), "the copy starts the next micro-batch with no gradient");
        assert_eq!(w.grad().kind(), Kind::Float);
        // The last one's, 2^-9: below bf16's resolution at 1 (2^-7), so a bf16 sum would stay 1.
        let small = 2f64.powi(-9);
        (w16.to_kind(Kind::Float) * small).sum(Kind::Float).backward();
        let piece =
            model.params.grad_pieces().into_iter().find(|p| p.offset == model.params.layout.offsets[i]).unwrap();
        assert_eq!(piece.grad.kind(), Kind::Float);
        assert!(piece.grad.equal(&Tensor::full([n], 1.0 + small, (Kind::Float, Device::Cpu))));
        // A third micro-batch's fold adds to what is there.
        model.params.fold_copy_grads().unwrap();
        assert!(w.grad().equal(&Tensor::full(w.size(), 1.0 + small, (Kind::Float, Device::Cpu))));
        model.params.zero_grad();
        assert!(!w.grad().defined() && !w16.grad().defined());
        // Without copies there is nothing to fold.
        model.set_bf16_weights(false);
        model.params.fold_copy_grads().unwrap();
    }
}
