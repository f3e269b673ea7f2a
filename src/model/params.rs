//! Parameters in one flat buffer.
//!
//! Every trainable tensor of the model is a view into a single contiguous fp32 buffer, ordered so that all
//! weight-decayed tensors (the matmul weights) come first and the rest (biases, LayerNorm, embeddings) after.
//! This is the layout the rest of Tessera is built around:
//! - the optimizer updates the whole model with a handful of elementwise kernels over one tensor, and weight
//!   decay is a prefix (`..decay_len`) rather than a per-tensor flag;
//! - data parallelism all-reduces one flat gradient, and ZeRO sharding gives each rank a contiguous range;
//! - checkpoints and export address tensors by their Hugging Face GPT-2 names through the [`ParamLayout`].
//!
//! The views are autograd leaves: `flat` itself does not require grad, so narrowing it gives tensors with no
//! `grad_fn` that can be marked `requires_grad`. Updating `flat` in place (under `no_grad`) updates them.

use super::optim::GradPiece;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Serialises every use of libtorch's global random generator that must be reproducible.
pub static RNG_LOCK: Mutex<()> = Mutex::new(());

/// How a tensor is initialised (GPT-2's scheme).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, std).
    Normal(f64),
    Zeros,
    Ones,
}

/// One named tensor of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Hugging Face GPT-2 name, e.g. `transformer.h.0.attn.c_attn.weight`.
    pub name: String,
    pub shape: Vec<i64>,
    /// Whether AdamW's decoupled weight decay applies (matmul weights only).
    pub decay: bool,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// Where each named tensor lives in the flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamLayout {
    /// In model order (the order [`ParamLayout::new`] was given).
    pub specs: Vec<ParamSpec>,
    /// Start of each spec in the flat buffer, parallel to `specs`.
    pub offsets: Vec<i64>,
    /// Elements `[0, decay_len)` are weight-decayed; `[decay_len, numel)` are not.
    pub decay_len: i64,
    /// Spec indices in buffer order (by offset), for gathering per-tensor gradients into the flat layout.
    pub by_offset: Vec<usize>,
    pub numel: i64,
}

impl ParamLayout {
    /// Lays the specs out: decayed tensors first, each group in the given order.
    pub fn new(specs: Vec<ParamSpec>) -> Self {
        let mut offsets = vec![0; specs.len()];
        let mut at = 0;
        for pass_decay in [true, false] {
            for (i, s) in specs.iter().enumerate() {
                if s.decay == pass_decay {
                    offsets[i] = at;
                    at += s.numel();
                }
            }
        }
        let decay_len = specs.iter().filter(|s| s.decay).map(ParamSpec::numel).sum();
        let mut by_offset: Vec<usize> = (0..specs.len()).collect();
        by_offset.sort_by_key(|&i| offsets[i]);
        ParamLayout { specs, offsets, decay_len, numel: at, by_offset }
    }

    /// Index of the spec with this name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }
}

/// The flat buffer and its per-tensor views.
pub struct Params {
    pub layout: ParamLayout,
    /// All parameters, fp32, shape `[numel]`. Does not require grad.
    pub flat: Tensor,
    /// One leaf view per spec, shaped, `requires_grad`, aliasing `flat`.
    views: Vec<Tensor>,
    /// bf16 copies of the weight-decayed prefix (the matmul weights), when on ([`Params::enable_shadow`]).
    shadow: Option<Shadow>,
}

/// bf16 copies of the matmul weights for a forward under bf16 autocast: the values autocast's casts would
/// give, kept from step to step, and written by Tessera's AdamW kernel as it updates the fp32 weights, so
/// that no step casts them again (6 bytes a weight forward, and 6 more for the cast's gradient). Their
/// gradients are bf16, the values the cast's gradient would have held in fp32.
///
/// The copies are current while `flat`'s version counter (moved on by every in-place write, the AdamW kernel's
/// included) is where it was when they were last made or written.
struct Shadow {
    /// bf16, shape `[decay_len]`.
    flat: Tensor,
    /// Per spec: a shaped bf16 leaf view of `flat` (`requires_grad`) for the weight-decayed ones.
    views: Vec<Option<Tensor>>,
    /// `flat`'s (the fp32 buffer's) version when the copies were last made or written.
    made_at: i64,
}

impl Params {
    /// Allocates the buffer on `device` and initialises every tensor in spec order from `seed`, so a seed
    /// always gives the same weights on a given device.
    ///
    /// libtorch's generator is process-global and tch exposes no private one, so seeding and drawing happen
    /// under [`RNG_LOCK`]: two models initialised at once on different threads (tests, or a rank actor
    /// beside another) cannot interleave their draws.
    pub fn init(layout: ParamLayout, device: Device, seed: u64) -> Self {
        let flat = Tensor::zeros([layout.numel], (Kind::Float, device));
        let params = Self::from_flat(layout, flat);
        let _rng = RNG_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tch::manual_seed(seed as i64);
        tch::no_grad(|| {
            for (spec, view) in params.layout.specs.iter().zip(&params.views) {
                let mut v = view.shallow_clone();
                match spec.init {
                    Init::Normal(std) => {
                        let _ = v.normal_(0.0, std);
                    }
                    Init::Zeros => {
                        let _ = v.zero_();
                    }
                    Init::Ones => {
                        let _ = v.fill_(1.0);
                    }
                }
            }
        });
        params
    }

    /// Wraps an existing flat buffer (for example one loaded from a checkpoint).
    ///
    /// # Panics
    /// If `flat` is not a 1-D fp32 tensor of `layout.numel` elements: that is a programming error, since
    /// loaders check shapes against the layout first.
    pub fn from_flat(layout: ParamLayout, flat: Tensor) -> Self {
        assert_eq!(flat.size(), vec![layout.numel], "flat buffer does not match the layout");
        assert_eq!(flat.kind(), Kind::Float, "flat parameters are fp32");
        let flat = flat.detach();
        let views = layout
            .specs
            .iter()
            .zip(&layout.offsets)
            .map(|(s, &off)| flat.narrow(0, off, s.numel()).view(s.shape.as_slice()).set_requires_grad(true))
            .collect();
        Params { layout, flat, views, shadow: None }
    }

    /// Keeps bf16 copies of the weight-decayed tensors (see [`Shadow`]); [`Params::shadow_view`] gives them.
    pub fn enable_shadow(&mut self) {
        if self.shadow.is_some() {
            return;
        }
        let _guard = tch::no_grad_guard();
        let len = self.layout.decay_len;
        let flat = self.flat.narrow(0, 0, len).to_kind(Kind::BFloat16).detach();
        let views = (0..self.layout.specs.len())
            .map(|i| {
                let (spec, off) = (&self.layout.specs[i], self.layout.offsets[i]);
                spec.decay
                    .then(|| flat.narrow(0, off, spec.numel()).view(spec.shape.as_slice()).set_requires_grad(true))
            })
            .collect();
        self.shadow = Some(Shadow { flat, views, made_at: self.flat.internal_version() });
    }

    /// Drops the bf16 copies.
    pub fn disable_shadow(&mut self) {
        self.shadow = None;
    }

    /// Whether bf16 copies are kept ([`Params::enable_shadow`]).
    pub fn has_shadow(&self) -> bool {
        self.shadow.is_some()
    }

    /// The bf16 copy of spec `i`, if it has one.
    pub fn shadow_view(&self, i: usize) -> Option<Tensor> {
        self.shadow.as_ref().and_then(|s| s.views[i].as_ref().map(Tensor::shallow_clone))
    }

    /// Makes the bf16 copies current (one cast of the weights) unless they are; returns whether it cast.
    pub fn refresh_shadow(&mut self) -> bool {
        let version = self.flat.internal_version();
        let Some(s) = self.shadow.as_mut() else { return false };
        if s.made_at == version {
            return false;
        }
        let _guard = tch::no_grad_guard();
        s.flat.shallow_clone().copy_(&self.flat.narrow(0, 0, self.layout.decay_len));
        s.made_at = version;
        true
    }

    /// The bf16 copies' buffer (`[decay_len]`), for an optimizer that writes them as it updates `flat`.
    pub fn shadow_flat(&self) -> Option<Tensor> {
        self.shadow.as_ref().map(|s| s.flat.shallow_clone())
    }

    /// Records that the bf16 copies were written together with `flat`'s last update.
    pub fn shadow_written(&mut self) {
        let version = self.flat.internal_version();
        if let Some(s) = self.shadow.as_mut() {
            s.made_at = version;
        }
    }

    /// The leaf tensor for spec `i` (shares storage and autograd state with the one the model holds).
    pub fn view(&self, i: usize) -> Tensor {
        self.views[i].shallow_clone()
    }

    /// The leaf tensor named `name`.
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.layout.index_of(name).map(|i| self.view(i))
    }

    /// Iterates over `(name, view)` in model order.
    pub fn named(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.layout.specs.iter().map(|s| s.name.as_str()).zip(&self.views)
    }

    /// The accumulated gradients gathered into one flat fp32 tensor in the buffer's order (zeros for a tensor
    /// that received none): one copy of the parameters' size, after which the per-tensor gradients are
    /// dropped, so their memory is free for the optimizer.
    ///
    /// Gradients are per tensor, as autograd produces them, rather than views into a preset flat buffer:
    /// autograd then hands each gradient over (no zeroing pass, no read-add-write of a zeroed buffer), and
    /// this one gather is the only pass over them before the collectives. Measured on an H100 (2026-11-27),
    /// a preset buffer cost about 4 passes against this one's 2.
    pub fn flat_grad(&mut self) -> Tensor {
        let parts: Vec<Tensor> = self.grad_pieces().into_iter().map(|p| p.grad.to_kind(Kind::Float)).collect();
        let flat = Tensor::cat(&parts, 0);
        drop(parts);
        self.zero_grad();
        flat
    }

    /// The accumulated gradients where autograd left them, flattened, as pieces tiling the buffer in order
    /// (zeros for a tensor that received none), for an optimizer that needs no flat copy
    /// ([`crate::model::optim::AdamW::update_pieces`]). fp32, except the gradient of a bf16 copy that the
    /// forward used instead of its weight ([`Params::enable_shadow`]), which stays bf16 (unless it was
    /// folded into the weight's, [`Params::fold_copy_grads`]). The tensors keep their gradients until
    /// [`Params::zero_grad`].
    pub fn grad_pieces(&self) -> Vec<GradPiece> {
        self.layout
            .by_offset
            .iter()
            .map(|&i| {
                let g = self.views[i].grad();
                let g16 = self.shadow_view(i).map(|v| v.grad()).filter(Tensor::defined);
                let grad = match (g.defined(), g16) {
                    (true, None) => g.reshape([-1]).to_kind(Kind::Float),
                    (false, Some(g16)) => g16.reshape([-1]),
                    // Both (a forward that used the weight and its copy): added in fp32.
                    (true, Some(g16)) => g.reshape([-1]).to_kind(Kind::Float) + g16.reshape([-1]).to_kind(Kind::Float),
                    (false, None) => self.views[i].zeros_like().reshape([-1]),
                };
                GradPiece { offset: self.layout.offsets[i], grad }
            })
            .collect()
    }

    /// Adds each bf16 copy's gradient into its fp32 weight's, in fp32, and drops the copy's: after each
    /// micro-batch of a step of several, so that their gradients add up in fp32 (a copy's own gradient would
    /// add up in bf16), in the order autocast's casts' gradients would.
    ///
    /// # Errors
    /// libtorch's: out of memory for a weight's first fp32 gradient.
    pub fn fold_copy_grads(&self) -> Result<(), tch::TchError> {
        let Some(s) = &self.shadow else { return Ok(()) };
        for (copy, view) in s.views.iter().zip(&self.views) {
            if let Some(copy) = copy {
                crate::shim::fold_grad(copy, view)?;
            }
        }
        Ok(())
    }

    /// Drops the accumulated gradients (`grad = None` on every tensor and bf16 copy), before the first
    /// micro-batch of a step or after a failed one.
    pub fn zero_grad(&mut self) {
        let copies = self.shadow.iter().flat_map(|s| s.views.iter().flatten());
        for v in self.views.iter().chain(copies) {
            crate::shim::clear_grad(v).expect("clearing a gradient of a live tensor");
        }
    }
}
