//! The gradient all-reduce overlapped with backward (data parallelism with ZeRO 0 or 1, on transports whose
//! collectives can run beside compute: [`Communicator::overlaps_compute`]).
//!
//! The flat gradient is cut into [`Buckets`]: contiguous ranges of the flat buffer of about `bucket_elems`
//! elements, cut at tensor boundaries. During the last micro-batch's backward, a hook on every parameter
//! (autograd's post-accumulate-grad hook, through the shim) copies the parameter's finished gradient into its
//! place in the flat gradient; when a bucket's last tensor is in, the bucket goes to a communication thread,
//! which averages it across ranks while backward goes on with earlier layers.
//!
//! Every rank reduces the buckets in one fixed order, the same on all ranks ([`Buckets::order`]: by the
//! earliest layer a bucket holds, latest first, the order in which backward finishes them), and reduces all
//! of them before the step's other collectives, whatever happened locally: a rank that ran out of memory, or a
//! tensor that got no gradient, contributes zeros where nothing arrived. So the gang's collectives stay
//! aligned, and the agreement on out-of-memory after them (`super::step`) discards the attempt everywhere.

use crate::comm::{CommError, Communicator, ReduceOp};
use crate::model::{ParamLayout, Params};
use std::ffi::{c_int, c_void};
use std::sync::mpsc;
use std::sync::Mutex;
use tch::{Kind, TchError, Tensor};

/// How the flat gradient is cut for reduction, and in which order the buckets are reduced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    /// `(start, len)` of each bucket in the flat buffer, in buffer order.
    pub ranges: Vec<(i64, i64)>,
    /// The bucket of each parameter (by spec index).
    pub of_param: Vec<usize>,
    /// Bucket indices in reduction order.
    pub order: Vec<usize>,
}

impl Buckets {
    /// Buckets of at least `bucket_elems` elements (the last may be smaller), cut at tensor boundaries in
    /// buffer order. The reduction order puts first the bucket whose earliest tensor (in model order, the
    /// order of `layout.specs`) comes latest: backward finishes the last layers first.
    pub fn new(layout: &ParamLayout, bucket_elems: i64) -> Self {
        let mut ranges: Vec<(i64, i64)> = vec![];
        let mut of_param = vec![0; layout.specs.len()];
        let mut earliest: Vec<usize> = vec![];
        let mut open = false;
        for &i in &layout.by_offset {
            let (off, n) = (layout.offsets[i], layout.specs[i].numel());
            if !open {
                ranges.push((off, 0));
                earliest.push(i);
                open = true;
            }
            let b = ranges.len() - 1;
            ranges[b].1 = off + n - ranges[b].0;
            earliest[b] = earliest[b].min(i);
            of_param[i] = b;
            if ranges[b].1 >= bucket_elems.max(1) {
                open = false;
            }
        }
        let mut order: Vec<usize> = (0..ranges.len()).collect();
        order.sort_by_key(|&b| (std::cmp::Reverse(earliest[b]), std::cmp::Reverse(ranges[b].0)));
        Buckets { ranges, of_param, order }
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// What the overlapped reduction produced.
pub struct Reduced {
    /// The flat gradient, averaged across ranks.
    pub grad: Tensor,
    /// The squared L2 norm of this rank's own gradient before averaging (fp64, 0-d, from per-tensor norms).
    pub local_sq: Tensor,
    /// How many buckets were handed to the reduction thread by the hooks, that is while backward was still
    /// running (the rest went after it returned): how much of the reduction could overlap backward.
    pub ready_during_backward: usize,
}

/// What the hooks share with the step while backward runs.
struct Hooks<'a> {
    params: &'a Params,
    buckets: &'a Buckets,
    state: Mutex<HookState>,
    /// Multiplies the local gradient as it is copied (an injected fault, `StepFaults::grad_scale`).
    scale: Option<f64>,
}

struct HookState {
    flat: Tensor,
    pending: Vec<usize>,
    sent: Vec<bool>,
    tx: Option<mpsc::Sender<usize>>,
    local_sq: Vec<Tensor>,
    error: Option<TchError>,
    /// Buckets sent by the hooks.
    during: usize,
}

impl Hooks<'_> {
    /// Parameter `i`'s gradient is final: copy it into the flat gradient; send its bucket if complete.
    fn ready(&self, i: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let g = self.params.view(i).grad();
        if g.defined() {
            let (off, n) = (self.params.layout.offsets[i], self.params.layout.specs[i].numel());
            let copied = (|| -> Result<(), TchError> {
                let src = g.f_reshape([-1])?.f_to_kind(Kind::Float)?;
                let src = match self.scale {
                    Some(f) => src.f_mul_scalar(f)?,
                    None => src,
                };
                st.flat.f_narrow(0, off, n)?.f_copy_(&src)?;
                // One read of the gradient for its norm (no fp64 copy of it); squares are summed in fp64.
                st.local_sq.push(src.f_norm()?.f_to_kind(Kind::Double)?.f_square()?);
                Ok(())
            })();
            if let Err(e) = copied {
                st.error.get_or_insert(e);
            }
        }
        let b = self.buckets.of_param[i];
        st.pending[b] = st.pending[b].saturating_sub(1);
        if st.pending[b] == 0 && !st.sent[b] {
            st.sent[b] = true;
            st.during += 1;
            if let Some(tx) = &st.tx {
                let _ = tx.send(b);
            }
        }
    }
}

extern "C" fn on_grad_ready(ctx: *mut c_void, index: c_int) {
    // SAFETY: `ctx` is the `Hooks` that `reduce_overlapped` keeps alive until every hook is cleared.
    let hooks = unsafe { &*(ctx as *const Hooks<'_>) };
    // A panic must not cross into libtorch's C++; `ready` records errors instead of panicking.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hooks.ready(index as usize)));
}

/// Runs `backward` (the last micro-batch's forward and backward, or nothing when this rank has already
/// failed) with the gradient all-reduce overlapped, and returns its result with the averaged gradient.
///
/// # Errors
/// A collective's failure, or a libtorch error copying a gradient (both fail the step; the collectives have
/// all been issued by then, so the ranks stay aligned).
pub fn reduce_overlapped<R>(
    params: &Params,
    buckets: &Buckets,
    comm: &mut dyn Communicator,
    scale: Option<f64>,
    backward: impl FnOnce() -> R,
) -> Result<(R, Reduced), OverlapError> {
    let device = params.flat.device();
    let flat = Tensor::zeros([params.layout.numel], (Kind::Float, device));
    let mut pending = vec![0usize; buckets.len()];
    for &b in &buckets.of_param {
        pending[b] += 1;
    }
    let (tx, rx) = mpsc::channel::<usize>();
    let hooks = Hooks {
        params,
        buckets,
        state: Mutex::new(HookState {
            flat: flat.shallow_clone(),
            pending,
            sent: vec![false; buckets.len()],
            tx: Some(tx),
            local_sq: vec![],
            error: None,
            during: 0,
        }),
        scale,
    };
    let (result, comm_result) = std::thread::scope(|s| {
        let reducer = {
            let flat = flat.shallow_clone();
            s.spawn(move || -> Result<(), CommError> {
                let mut ready = vec![false; buckets.len()];
                for &b in &buckets.order {
                    while !ready[b] {
                        match rx.recv() {
                            Ok(x) => ready[x] = true,
                            Err(_) => {
                                let reason = "the step stopped before every gradient bucket was ready".into();
                                return Err(CommError::Invalid { op: "all_reduce", seq: 0, reason });
                            }
                        }
                    }
                    let (start, len) = buckets.ranges[b];
                    comm.all_reduce(&mut flat.narrow(0, start, len), ReduceOp::Avg)?;
                }
                Ok(())
            })
        };
        let ctx = &hooks as *const Hooks<'_> as *mut c_void;
        let mut hook_error = None;
        for i in 0..params.layout.specs.len() {
            // SAFETY: `hooks` outlives every hook: each is cleared below, before `hooks` is dropped, and the
            // callback catches panics.
            if let Err(e) = unsafe { crate::shim::set_grad_hook(&params.view(i), on_grad_ready, ctx, i) } {
                hook_error.get_or_insert(e);
            }
        }
        // A panic in backward must not leave the reduction thread waiting for buckets: catch it, finish the
        // collectives (the peers are in them), and let it go on unwinding afterwards.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(backward));
        for i in 0..params.layout.specs.len() {
            if let Err(e) = crate::shim::clear_grad_hook(&params.view(i)) {
                hook_error.get_or_insert(e);
            }
        }
        // Whatever did not arrive (no gradient, a failed backward) goes as it is: zeros or partial.
        {
            let mut st = hooks.state.lock().unwrap_or_else(|p| p.into_inner());
            let tx = st.tx.take().expect("sender present until now");
            for b in 0..buckets.len() {
                if !st.sent[b] {
                    st.sent[b] = true;
                    let _ = tx.send(b);
                }
            }
            if let Some(e) = hook_error {
                st.error.get_or_insert(e);
            }
        }
        let comm_result = reducer.join().unwrap_or_else(|_| {
            let reason = "the gradient reduction thread panicked".into();
            Err(CommError::Invalid { op: "all_reduce", seq: 0, reason })
        });
        (result, comm_result)
    });
    let result = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    comm_result?;
    let st = hooks.state.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = st.error {
        return Err(OverlapError::Torch(e));
    }
    let local_sq = st.local_sq.iter().fold(Tensor::zeros([], (Kind::Double, device)), |acc, t| acc + t);
    Ok((result, Reduced { grad: flat, local_sq, ready_during_backward: st.during }))
}

/// Why the overlapped reduction failed; both fail the step (recoverable by the supervisor).
#[derive(Debug, thiserror::Error)]
pub enum OverlapError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("libtorch: {0}")]
    Torch(TchError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt::param_specs;
    use crate::model::preset;

    #[test]
    fn buckets_cover_the_buffer_at_tensor_boundaries_and_reduce_the_last_layers_first() {
        let layout = ParamLayout::new(param_specs(&preset("tiny").unwrap()));
        let b = Buckets::new(&layout, 10_000);
        // Contiguous, in order, covering every element.
        let mut at = 0;
        for &(start, len) in &b.ranges {
            assert_eq!(start, at);
            assert!(len > 0);
            at += len;
        }
        assert_eq!(at, layout.numel);
        // Every tensor lies inside its bucket.
        for (i, s) in layout.specs.iter().enumerate() {
            let (start, len) = b.ranges[b.of_param[i]];
            assert!(layout.offsets[i] >= start && layout.offsets[i] + s.numel() <= start + len, "{}", s.name);
        }
        // A permutation, whose last bucket holds the token embedding (tensor 0, finished last in backward).
        let mut sorted = b.order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..b.len()).collect::<Vec<_>>());
        assert_eq!(*b.order.last().unwrap(), b.of_param[0]);
        assert!(b.len() > 2, "the tiny model makes several buckets of 10k elements");
        // One huge bucket when asked for.
        assert_eq!(Buckets::new(&layout, i64::MAX).ranges, vec![(0, layout.numel)]);
    }
}
