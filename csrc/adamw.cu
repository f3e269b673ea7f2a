// The optimizer's two passes over the gradients, compiled at run time with NVRTC (csrc/kernels.cpp):
//   sum_squares:  each block's share of the squared 2-norm of all gradients (the clipping norm);
//   adamw_update: AdamW over the flat fp32 parameters and moments, reading each gradient once, clipped by a
//                 coefficient it computes from that norm on the device.
//
// libtorch's `_fused_adamw_` takes the clipping as a `grad_scale` to divide by, and (made for loss-scale
// unscaling) then writes every unscaled gradient back: 4 bytes a parameter that nothing reads. Its norm
// (`_foreach_norm`, as `clip_grad_norm_`) ran at about 1.3 TB/s on an H100. Here the update reads p, g, m, v
// and writes p, m, v (28 bytes a parameter), and the norm reads g (4 bytes).
//
// The update's arithmetic is the installed torch 2.11 `_fused_adamw_`'s (ATen/native/cuda/fused_adam_utils.cuh)
// element for element: fp32 throughout, its fused multiply-adds for the moments, and the bias corrections
// computed on the device from the step number. The gradients come in pieces (autograd's per-tensor
// gradients, or one flat buffer), described by a table passed in the kernel's parameters: each block takes
// CHUNK elements of one piece. csrc/common.cuh comes first.

#define MAX_PIECES 48           // pieces per launch: the table stays under the 4 KB of kernel parameters
#define CHUNK (THREADS * 32)    // elements per block

// Mirrored in csrc/kernels.cpp (`PieceTable`), which fills it.
struct Pieces {
    u64 grad[MAX_PIECES];             // each piece's gradient (a device address)
    i64 offset[MAX_PIECES];           // where the piece starts in the flat range
    i64 numel[MAX_PIECES];
    int first_block[MAX_PIECES + 1];  // piece k's blocks are [first_block[k], first_block[k + 1])
    int bf16[MAX_PIECES];             // 1: the piece is bf16 (the gradient of a bf16 weight copy), 0: fp32
    int count;
};

// Element i of piece k's gradient, as fp32 (a bf16 value converts exactly).
__device__ __forceinline__ float grad_at(const Pieces& t, int k, i64 i) {
    return t.bf16[k] ? from_bf16(((const bf16*)t.grad[k])[i]) : ((const float*)t.grad[k])[i];
}

// The constants of one update, as the fused kernel has them (its double arguments cast to float).
struct AdamwHyper {
    float lr, beta1, beta2, weight_decay, eps;
    float step;          // this update's number, counting from 1
    float max_norm;      // clip to this global norm; <= 0: no clipping
};

// The piece this block works on (a binary search of the table), and the block's element range in it.
__device__ __forceinline__ int piece_of(const Pieces& t, i64& begin, i64& end) {
    int lo = 0, hi = t.count - 1;
    int b = blockIdx.x;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (t.first_block[mid] <= b) lo = mid; else hi = mid - 1;
    }
    begin = (i64)(b - t.first_block[lo]) * CHUNK;
    end = begin + CHUNK < t.numel[lo] ? begin + CHUNK : t.numel[lo];
    return lo;
}

extern "C" __global__ void __launch_bounds__(THREADS) sum_squares(const Pieces t, float* __restrict__ partial) {
    i64 begin, end;
    int k = piece_of(t, begin, end);
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;  // four loads in flight per thread
    i64 i = begin + threadIdx.x;
    for (; i + 3 * THREADS < end; i += 4 * THREADS) {
        float x0 = grad_at(t, k, i), x1 = grad_at(t, k, i + THREADS), x2 = grad_at(t, k, i + 2 * THREADS),
              x3 = grad_at(t, k, i + 3 * THREADS);
        a0 += x0 * x0;
        a1 += x1 * x1;
        a2 += x2 * x2;
        a3 += x3 * x3;
    }
    for (; i < end; i += THREADS) {
        float x = grad_at(t, k, i);
        a0 += x * x;
    }
    float s = (a0 + a1) + (a2 + a3);
    __shared__ float warps[THREADS / 32];
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warps[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < THREADS / 32; w++) total += warps[w];
        partial[blockIdx.x] = total;
    }
}

// One element of `_fused_adamw_`'s update (ADAMW mode, no amsgrad, not maximize), given its step size and
// sqrt(1 - beta2^t).
__device__ __forceinline__ void adamw_element(float& p, float& m, float& v, float g, bool decay, const AdamwHyper& h,
                                              float step_size, float bc2_sqrt) {
    if (decay && h.weight_decay != 0.0f) p -= h.lr * h.weight_decay * p;
    m = fmaf(h.beta1, m, fmaf(-h.beta1, g, g));
    v = fmaf(h.beta2, v, fmaf(-h.beta2, g * g, g * g));
    float denom = (sqrtf(v) / bc2_sqrt) + h.eps;
    p -= step_size * m / denom;
}

// `norm` (one fp32 element, may be null when h.max_norm <= 0) is the global gradient norm; every gradient is
// divided by max((norm + 1e-6) / max_norm, 1) as it is read, which is clipping to max_norm. Elements of the
// flat range before `decay_len` are weight-decayed. `shadow` (may be null): the bf16 copies of the range's
// first `shadow_len` parameters, each written with its parameter's new value.
extern "C" __global__ void __launch_bounds__(THREADS) adamw_update(const Pieces t, float* __restrict__ param,
                                                                   float* __restrict__ exp_avg,
                                                                   float* __restrict__ exp_avg_sq,
                                                                   const float* __restrict__ norm, i64 decay_len,
                                                                   bf16* __restrict__ shadow, i64 shadow_len,
                                                                   const AdamwHyper h) {
    i64 begin, end;
    int k = piece_of(t, begin, end);
    const i64 at = t.offset[k];
    const bool clip = h.max_norm > 0.0f && norm != nullptr;
    float scale = 1.0f;
    if (clip) {
        float s = (norm[0] + 1e-6f) / h.max_norm;
        scale = s < 1.0f ? 1.0f : s;  // a NaN norm stays NaN (as libtorch's clamp_min), not "no clipping"
    }
    const float step_size = h.lr / (1.0f - powf(h.beta1, h.step));
    const float bc2_sqrt = sqrtf(1.0f - powf(h.beta2, h.step));
    // Four elements a thread at a time, loads first, so that each thread has 16 loads in flight.
    i64 i = begin + threadIdx.x;
    for (; i + 3 * THREADS < end; i += 4 * THREADS) {
        float gs[4], ps[4], ms[4], vs[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            i64 e = i + q * THREADS;
            gs[q] = grad_at(t, k, e);
            ps[q] = param[at + e];
            ms[q] = exp_avg[at + e];
            vs[q] = exp_avg_sq[at + e];
        }
#pragma unroll
        for (int q = 0; q < 4; q++) {
            i64 e = i + q * THREADS;
            float gq = clip ? gs[q] / scale : gs[q];
            adamw_element(ps[q], ms[q], vs[q], gq, at + e < decay_len, h, step_size, bc2_sqrt);
            param[at + e] = ps[q];
            exp_avg[at + e] = ms[q];
            exp_avg_sq[at + e] = vs[q];
            if (shadow != nullptr && at + e < shadow_len) shadow[at + e] = (bf16)to_bf16(ps[q]);
        }
    }
    for (; i < end; i += THREADS) {
        float p = param[at + i], m = exp_avg[at + i], v = exp_avg_sq[at + i];
        float g = grad_at(t, k, i);
        float gq = clip ? g / scale : g;
        adamw_element(p, m, v, gq, at + i < decay_len, h, step_size, bc2_sqrt);
        param[at + i] = p;
        exp_avg[at + i] = m;
        exp_avg_sq[at + i] = v;
        if (shadow != nullptr && at + i < shadow_len) shadow[at + i] = (bf16)to_bf16(p);
    }
}
