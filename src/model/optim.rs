//! AdamW over the flat parameter buffer, with state we own (and so can checkpoint and shard).
//!
//! The update is PyTorch's `torch.optim.AdamW` (single-tensor path) written out op for op, so that a step
//! matches PyTorch's to float rounding: decoupled weight decay, then the moment updates, then the bias-corrected
//! step. Weight decay applies to the prefix `[0, decay_len)` of the buffer (the matmul weights; see
//! [`super::params`]). Because the state is three flat tensors over a contiguous range, a ZeRO-sharded rank
//! runs the same code on its own range.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Hyper-parameters. The learning rate comes from the schedule at each step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// GPT-3's settings: betas (0.9, 0.95), eps 1e-8, weight decay 0.1.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// Moments and step count for one contiguous range of the flat parameters.
pub struct AdamW {
    pub config: AdamWConfig,
    /// First moment, fp32, same shape as the range it updates.
    pub exp_avg: Tensor,
    /// Second moment, fp32.
    pub exp_avg_sq: Tensor,
    /// Number of updates applied so far (the `t` of Adam's bias correction).
    pub step: i64,
    /// Use libtorch's fused AdamW kernel (one pass over parameters, gradients and moments) instead of the
    /// op-by-op reference update. Both compute PyTorch's AdamW; they agree to float rounding. Default on.
    pub fused: bool,
    /// On CUDA, Tessera's own AdamW kernel (`csrc/adamw.cu`) instead of libtorch's fused one: the same
    /// arithmetic, but clipping does not write every gradient back (libtorch's takes the clip as a loss-scale
    /// to undo, and stores the unscaled gradient). Off elsewhere. Default off until a GPU has measured it.
    pub kernel: bool,
    /// The step number as a device tensor, for the fused kernel.
    step_tensor: Option<Tensor>,
}

/// The gradient of elements `[offset, offset + grad.numel())` of the range an [`AdamW`] updates: 1-D, fp32.
pub struct GradPiece {
    pub offset: i64,
    pub grad: Tensor,
}

/// Elements per tensor handed to the fused kernel: its multi-tensor launcher indexes chunks with 32-bit
/// integers, so the flat buffer (over 2^31 elements from about 2B parameters) goes in pieces.
const FUSED_PIECE: i64 = 1 << 28;

impl AdamW {
    /// Zeroed state for a range shaped like `params`.
    pub fn new(config: AdamWConfig, params: &Tensor) -> Self {
        AdamW {
            config,
            exp_avg: params.zeros_like().to_kind(Kind::Float),
            exp_avg_sq: params.zeros_like().to_kind(Kind::Float),
            step: 0,
            fused: true,
            kernel: false,
            step_tensor: None,
        }
    }

    /// One update of `params` (a flat range) from `grad` (same shape) at learning rate `lr`. Elements
    /// `[0, decay_len)` of the range are weight-decayed.
    ///
    /// With [`AdamW::fused`], libtorch's fused kernel runs; should it fail (it needs fp32 contiguous tensors
    /// on one device), the reference update runs instead, with a warning, so a step is never lost to it.
    pub fn update(&mut self, params: &Tensor, grad: &Tensor, decay_len: i64, lr: f64) {
        self.update_clipped(params, grad, decay_len, lr, None);
    }

    /// [`AdamW::update`] of a gradient clipped to global norm `max_norm` first, given that norm (a 0-d
    /// tensor, so nothing is read back): `clip = Some((norm, max_norm))`, as [`clip_to_norm`] would do. The
    /// fused kernel applies the clipping coefficient as it reads each gradient, saving the clipping pass; the
    /// reference path clips in place first. `max_norm <= 0` disables clipping.
    pub fn update_clipped(
        &mut self,
        params: &Tensor,
        grad: &Tensor,
        decay_len: i64,
        lr: f64,
        clip: Option<(&Tensor, f64)>,
    ) {
        let whole = [GradPiece { offset: 0, grad: grad.shallow_clone() }];
        self.update_pieces(params, &whole, decay_len, lr, clip);
    }

    /// [`AdamW::update_clipped`] with the gradient in pieces that tile the range in order (for example
    /// autograd's per-tensor gradients, read where they are rather than gathered into one buffer first).
    /// The fused kernel takes the pieces as they are; the reference path gathers them first. A piece may be
    /// bf16 (the gradient of a bf16 weight copy, [`crate::model::params::Params::enable_shadow`]).
    ///
    /// # Panics
    /// If the pieces do not tile `[0, params.numel())` in order: a programming error.
    pub fn update_pieces(
        &mut self,
        params: &Tensor,
        pieces: &[GradPiece],
        decay_len: i64,
        lr: f64,
        clip: Option<(&Tensor, f64)>,
    ) {
        self.update_pieces_with_copies(params, pieces, decay_len, lr, clip, None);
    }

    /// [`AdamW::update_pieces`], also writing `shadow` (bf16 copies of the range's first parameters) with
    /// the new values where Tessera's kernel runs. Returns whether it did; where it did not, `params` changed
    /// through libtorch and its version counter says the copies are stale.
    ///
    /// # Panics
    /// As [`AdamW::update_pieces`].
    pub fn update_pieces_with_copies(
        &mut self,
        params: &Tensor,
        pieces: &[GradPiece],
        decay_len: i64,
        lr: f64,
        clip: Option<(&Tensor, f64)>,
        shadow: Option<&Tensor>,
    ) -> bool {
        let mut at = 0;
        for p in pieces {
            assert_eq!(p.offset, at, "gradient pieces must tile the parameters in order");
            at += p.grad.numel() as i64;
        }
        assert_eq!(at, params.numel() as i64, "gradient pieces must cover the parameters");
        let clip = clip.filter(|&(_, max_norm)| max_norm > 0.0);
        if self.kernel && params.device().is_cuda() {
            match self.update_kernel(params, pieces, decay_len, lr, clip, shadow) {
                Ok(()) => return shadow.is_some(),
                Err(e) => given_up(&mut self.kernel, &mut self.step, "Tessera's AdamW kernel", "libtorch's", e),
            }
        }
        // libtorch's updates take fp32 gradients.
        let fp32: Vec<GradPiece>;
        let pieces = if pieces.iter().any(|p| p.grad.kind() != Kind::Float) {
            fp32 = pieces.iter().map(|p| GradPiece { offset: p.offset, grad: p.grad.to_kind(Kind::Float) }).collect();
            &fp32[..]
        } else {
            pieces
        };
        if self.fused {
            // The kernel divides by `grad_scale`: the inverse of `min(1, max_norm / (norm + 1e-6))`.
            let scale = clip.map(|(norm, max_norm)| {
                tch::no_grad(|| ((norm.to_kind(Kind::Float) + 1e-6) / max_norm).clamp_min(1.0).reshape([1]))
            });
            match self.update_fused(params, pieces, decay_len, lr, scale.as_ref()) {
                Ok(()) => return false,
                Err(e) => given_up(&mut self.fused, &mut self.step, "fused AdamW", "the reference update", e),
            }
        }
        let grad = match pieces {
            [one] => one.grad.shallow_clone(),
            _ => Tensor::cat(&pieces.iter().map(|p| p.grad.shallow_clone()).collect::<Vec<_>>(), 0),
        };
        if let Some((norm, max_norm)) = clip {
            clip_to_norm(&grad, norm, max_norm);
        }
        self.update_reference(params, &grad, decay_len, lr);
        false
    }

    /// The 2-norm of `grads` taken together, for clipping (a 0-d fp32 tensor; nothing is read back):
    /// `clip_grad_norm_`'s (per-tensor norms in one multi-tensor kernel, then theirs), or with
    /// [`AdamW::kernel`] on CUDA Tessera's own kernel's, which reads each gradient once. Should that kernel
    /// fail, libtorch's runs instead, with a warning, and [`AdamW::kernel`] is turned off.
    ///
    /// # Errors
    /// libtorch's.
    pub fn global_norm(&mut self, grads: &[&Tensor]) -> Result<Tensor, tch::TchError> {
        if self.kernel && grads.first().is_some_and(|g| g.device().is_cuda()) {
            match crate::shim::grad_norm_kernel(grads.iter().copied()) {
                Ok(norm) => return Ok(norm),
                Err(e) => {
                    crate::say!(
                        "tessera: warning: Tessera's gradient-norm kernel failed ({e}); using libtorch's from now on"
                    );
                    self.kernel = false;
                }
            }
        }
        // libtorch's multi-tensor norm of bf16 tensors would be bf16: fp32 copies of those.
        let fp32: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float)).collect();
        crate::shim::global_norm(&fp32)
    }

    /// The update through Tessera's own kernel ([`crate::shim::adamw_kernel`]).
    fn update_kernel(
        &mut self,
        params: &Tensor,
        pieces: &[GradPiece],
        decay_len: i64,
        lr: f64,
        clip: Option<(&Tensor, f64)>,
        shadow: Option<&Tensor>,
    ) -> Result<(), tch::TchError> {
        let _guard = tch::no_grad_guard();
        let c = self.config;
        self.step += 1;
        let pieces: Vec<(i64, &Tensor)> = pieces.iter().map(|p| (p.offset, &p.grad)).collect();
        let norm = clip.map(|(norm, max_norm)| (norm.to_kind(Kind::Float).reshape([1]), max_norm));
        let update = crate::shim::AdamWKernel {
            params,
            exp_avg: &self.exp_avg,
            exp_avg_sq: &self.exp_avg_sq,
            pieces: &pieces,
            decay_len: decay_len.clamp(0, params.numel() as i64),
            step: self.step,
            clip: norm.as_ref().map(|(n, m)| (n, *m)),
            shadow,
        };
        crate::shim::adamw_kernel(update, lr, c.beta1, c.beta2, c.weight_decay, c.eps)
    }

    /// The update through libtorch's `_fused_adamw_`: the weight-decayed prefix and the rest as two groups,
    /// each a list of pieces of at most [`FUSED_PIECE`] elements.
    fn update_fused(
        &mut self,
        params: &Tensor,
        pieces: &[GradPiece],
        decay_len: i64,
        lr: f64,
        grad_scale: Option<&Tensor>,
    ) -> Result<(), tch::TchError> {
        let _guard = tch::no_grad_guard();
        let c = self.config;
        self.step += 1;
        let step = self.step_tensor.get_or_insert_with(|| Tensor::zeros([1], (Kind::Float, params.device())));
        let _ = step.fill_(self.step as f64);
        let decay_len = decay_len.clamp(0, params.numel() as i64);
        // (offset in the range, length, the gradient piece it comes from, offset within that piece)
        let mut groups: [Vec<(i64, i64, &Tensor, i64)>; 2] = [vec![], vec![]];
        for p in pieces {
            let end = p.offset + p.grad.numel() as i64;
            let mut s = p.offset;
            while s < end {
                // Cut at the decay boundary and every FUSED_PIECE elements.
                let stop = if s < decay_len { decay_len.min(end) } else { end };
                let len = FUSED_PIECE.min(stop - s);
                groups[usize::from(s >= decay_len)].push((s, len, &p.grad, s - p.offset));
                s += len;
            }
        }
        for (cuts, wd) in groups.iter().zip([c.weight_decay, 0.0]) {
            if cuts.is_empty() {
                continue;
            }
            let of = |t: &Tensor| cuts.iter().map(|&(s, l, _, _)| t.narrow(0, s, l)).collect::<Vec<_>>();
            let grads: Vec<Tensor> = cuts.iter().map(|&(_, l, g, at)| g.narrow(0, at, l)).collect();
            let tensors = crate::shim::AdamWTensors {
                params: &of(params),
                grads: &grads,
                exp_avgs: &of(&self.exp_avg),
                exp_avg_sqs: &of(&self.exp_avg_sq),
                step,
                grad_scale,
            };
            crate::shim::fused_adamw(tensors, lr, c.beta1, c.beta2, wd, c.eps)?;
        }
        Ok(())
    }

    /// The reference update, op by op as PyTorch's single-tensor AdamW.
    pub fn update_reference(&mut self, params: &Tensor, grad: &Tensor, decay_len: i64, lr: f64) {
        let _guard = tch::no_grad_guard();
        let c = self.config;
        self.step += 1;
        let mut p = params.shallow_clone();
        if c.weight_decay != 0.0 && decay_len > 0 {
            let _ = p.narrow(0, 0, decay_len).g_mul_scalar_(1.0 - lr * c.weight_decay);
        }
        let _ = self.exp_avg.lerp_(grad, 1.0 - c.beta1);
        let _ = self.exp_avg_sq.g_mul_scalar_(c.beta2).addcmul_(grad, &(grad * (1.0 - c.beta2)));
        let bias_correction1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - c.beta2.powi(self.step as i32);
        let step_size = lr / bias_correction1;
        let denom = (self.exp_avg_sq.sqrt() / bias_correction2.sqrt()) + c.eps;
        let _ = p.g_add_(&(self.exp_avg.g_div(&denom) * (-step_size)));
    }
}

/// A failed update path is not tried again: says so once, turns its flag off and takes back the step it
/// counted (each path counts the step it takes), for the next path to take the step.
fn given_up(flag: &mut bool, step: &mut i64, what: &str, instead: &str, e: tch::TchError) {
    crate::say!("tessera: warning: {what} failed ({e}); using {instead} from now on");
    *flag = false;
    *step -= 1;
}

/// Scales `grad` in place by `max_norm / (norm + 1e-6)` clamped to 1, given the global `norm` (computed by the
/// caller, e.g. across the shards of all ranks). `max_norm <= 0` disables clipping.
pub fn clip_to_norm(grad: &Tensor, norm: &Tensor, max_norm: f64) {
    if max_norm > 0.0 {
        let _guard = tch::no_grad_guard();
        let coef = (max_norm / (norm + 1e-6)).clamp_max(1.0);
        let _ = grad.shallow_clone().g_mul_(&coef);
    }
}

/// Which contiguous range of the flat parameters a rank's optimizer owns.
///
/// Plain data parallelism (`zero = 0`) owns everything. With ZeRO sharding the flat buffer is padded to
/// `world · len` elements and rank `r` owns `[r·len, (r+1)·len)`, so optimizer state per rank is about `1/W`
/// of the model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLayout {
    /// ZeRO stage: 0 (replicated), 1 (sharded optimizer state), 2 (also gradients reduce-scattered).
    pub zero: u8,
    pub rank: usize,
    pub world: usize,
    /// Elements in the unpadded flat buffer.
    pub numel: i64,
    /// Elements per shard (the whole buffer when `zero == 0`).
    pub len: i64,
}

impl ShardLayout {
    pub fn new(zero: u8, rank: usize, world: usize, numel: i64) -> Self {
        let len = if zero == 0 { numel } else { (numel + world as i64 - 1) / world as i64 };
        ShardLayout { zero, rank, world, numel, len }
    }

    /// First element this rank owns.
    pub fn start(&self) -> i64 {
        if self.zero == 0 {
            0
        } else {
            self.rank as i64 * self.len
        }
    }

    /// Size of the padded buffer the collectives work on.
    pub fn padded(&self) -> i64 {
        if self.zero == 0 {
            self.numel
        } else {
            self.len * self.world as i64
        }
    }

    /// How many of this shard's elements are weight-decayed, given the buffer's decayed prefix.
    pub fn decay_len_in_shard(&self, decay_len: i64) -> i64 {
        (decay_len - self.start()).clamp(0, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn the_fused_update_agrees_with_the_reference_over_several_steps_with_a_decayed_prefix() {
        let _g = crate::model::params::RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(11);
        let opts = (Kind::Float, Device::Cpu);
        let p0 = Tensor::randn([5000], opts);
        let (pf, pr) = (p0.copy(), p0.copy());
        let (mut fused, mut reference) =
            (AdamW::new(AdamWConfig::default(), &pf), AdamW::new(AdamWConfig::default(), &pr));
        reference.fused = false;
        for step in 0..5 {
            let g = Tensor::randn([5000], opts);
            fused.update(&pf, &g, 3000, 1e-3 * (step + 1) as f64);
            reference.update(&pr, &g, 3000, 1e-3 * (step + 1) as f64);
        }
        assert!(fused.fused, "the fused kernel fell back to the reference update");
        assert_eq!((fused.step, reference.step), (5, 5));
        let diff = (&pf - &pr).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "fused and reference parameters differ by {diff}");
        let diff = (&fused.exp_avg_sq - &reference.exp_avg_sq).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "second moments differ by {diff}");
    }

    #[test]
    fn per_tensor_gradient_pieces_give_the_update_of_the_gathered_flat_gradient() {
        let _g = crate::model::params::RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(12);
        let opts = (Kind::Float, Device::Cpu);
        let p0 = Tensor::randn([5000], opts);
        let (pf, pp) = (p0.copy(), p0.copy());
        let (mut flat, mut pieced) = (AdamW::new(AdamWConfig::default(), &pf), AdamW::new(AdamWConfig::default(), &pp));
        // Pieces that straddle the decay boundary (3000) and are of uneven sizes.
        let cuts = [0i64, 700, 2999, 3001, 4990, 5000];
        for step in 0..3 {
            let g = Tensor::randn([5000], opts);
            let norm = g.norm();
            let pieces: Vec<GradPiece> = cuts
                .windows(2)
                .map(|w| GradPiece { offset: w[0], grad: g.narrow(0, w[0], w[1] - w[0]).copy() })
                .collect();
            let piece_norm = crate::shim::global_norm(pieces.iter().map(|p| &p.grad)).unwrap();
            let rel = ((&piece_norm - &norm).abs() / &norm).double_value(&[]);
            assert!(rel < 1e-6, "the norm of the pieces is off by {rel} (relative)");
            let lr = 1e-3 * (step + 1) as f64;
            flat.update_clipped(&pf, &g, 3000, lr, Some((&norm, 1.0)));
            pieced.update_pieces(&pp, &pieces, 3000, lr, Some((&norm, 1.0)));
        }
        assert!(flat.fused && pieced.fused, "the fused kernel fell back to the reference update");
        // Equal up to the CPU kernel's vector/scalar split, which falls at other elements for other pieces.
        let dp = (&pf - &pp).abs().max().double_value(&[]);
        let dm = (&flat.exp_avg - &pieced.exp_avg).abs().max().double_value(&[]);
        let dv = (&flat.exp_avg_sq - &pieced.exp_avg_sq).abs().max().double_value(&[]);
        assert!(dp < 1e-9 && dm < 1e-9 && dv < 1e-9, "parameters, moments differ by {dp}, {dm}, {dv}");
    }

    /// Two optimizers over the same 3000 parameters (`[0, 1200)` decayed) for three clipped steps, each fed its
    /// own gradient pieces for the step from `pieces(step)`; returns both, with their parameters.
    fn side_by_side(
        seed: i64,
        setup: impl Fn(&mut AdamW, &mut AdamW),
        pieces: impl Fn(i64) -> (Vec<GradPiece>, Vec<GradPiece>),
    ) -> [(AdamW, Tensor); 2] {
        let _g = crate::model::params::RNG_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(seed);
        let p0 = Tensor::randn([3000], (Kind::Float, Device::Cpu));
        let (pa, pb) = (p0.copy(), p0.copy());
        let (mut a, mut b) = (AdamW::new(AdamWConfig::default(), &pa), AdamW::new(AdamWConfig::default(), &pb));
        setup(&mut a, &mut b);
        for step in 0..3 {
            let (ga, gb) = pieces(step);
            let na = a.global_norm(&ga.iter().map(|p| &p.grad).collect::<Vec<_>>()).unwrap();
            let nb = b.global_norm(&gb.iter().map(|p| &p.grad).collect::<Vec<_>>()).unwrap();
            assert!(na.equal(&nb) && nb.kind() == Kind::Float, "step {step}: norms {na:?} and {nb:?}");
            let lr = 1e-3 * (step + 1) as f64;
            a.update_pieces(&pa, &ga, 1200, lr, Some((&na, 1.0)));
            b.update_pieces(&pb, &gb, 1200, lr, Some((&nb, 1.0)));
        }
        [(a, pa), (b, pb)]
    }

    /// Three pieces of random gradients (values a bf16 tensor holds exactly), tiling 3000 elements.
    fn bf16_valued_pieces() -> Vec<Tensor> {
        [1000, 1500, 500]
            .into_iter()
            .map(|n| (Tensor::randn([n], (Kind::Float, Device::Cpu)) * 10.0).to_kind(Kind::BFloat16))
            .collect()
    }

    const AT: [i64; 3] = [0, 1000, 2500];

    #[test]
    fn asking_for_the_adamw_kernel_off_cuda_changes_nothing() {
        let [(plain, pa), (asked, pb)] = side_by_side(
            13,
            |_, b| b.kernel = true,
            |_| {
                // Each its own copy: libtorch's fused update writes the clipped gradient back.
                let values = bf16_valued_pieces();
                let fp32 = |v: &Tensor| v.to_kind(Kind::Float);
                let make = || AT.iter().zip(&values).map(|(&offset, v)| GradPiece { offset, grad: fp32(v) }).collect();
                (make(), make())
            },
        );
        assert!(pa.equal(&pb) && plain.exp_avg_sq.equal(&asked.exp_avg_sq));
        assert!(asked.kernel, "a kernel that does not apply has not failed either");
    }

    #[test]
    fn bf16_gradient_pieces_give_the_norm_and_update_of_their_values_in_fp32() {
        let [(fp32, pa), (mixed, pb)] = side_by_side(
            14,
            |_, _| {},
            |_| {
                let values = bf16_valued_pieces();
                let piece = |k: usize, bf16: bool| GradPiece {
                    offset: AT[k],
                    grad: if bf16 { values[k].copy() } else { values[k].to_kind(Kind::Float) },
                };
                // The middle piece as bf16 on one side.
                ((0..3).map(|k| piece(k, false)).collect(), (0..3).map(|k| piece(k, k == 1)).collect())
            },
        );
        assert!(pa.equal(&pb) && fp32.exp_avg.equal(&mixed.exp_avg));
    }

    #[test]
    #[should_panic(expected = "tile")]
    fn pieces_with_a_gap_are_refused() {
        let p = Tensor::zeros([10], (Kind::Float, Device::Cpu));
        let mut opt = AdamW::new(AdamWConfig::default(), &p);
        let piece = |offset, n| GradPiece { offset, grad: Tensor::ones([n], (Kind::Float, Device::Cpu)) };
        opt.update_pieces(&p, &[piece(0, 4), piece(5, 5)], 0, 1e-3, None);
    }

    #[test]
    fn shards_cover_the_buffer_and_split_the_decay_prefix() {
        let l = |rank| ShardLayout::new(2, rank, 3, 10);
        assert_eq!((l(0).len, l(0).padded()), (4, 12));
        assert_eq!([l(0).start(), l(1).start(), l(2).start()], [0, 4, 8]);
        assert_eq!([l(0).decay_len_in_shard(6), l(1).decay_len_in_shard(6), l(2).decay_len_in_shard(6)], [4, 2, 0]);
        let replicated = ShardLayout::new(0, 1, 3, 10);
        assert_eq!((replicated.start(), replicated.len, replicated.decay_len_in_shard(6)), (0, 10, 6));
    }
}
