// Cross-entropy over bf16 logits in two memory passes, compiled at run time with NVRTC (csrc/kernels.cpp).
//
// The ATen path in shim.cpp reads or writes an (N, V) tensor about seven times: a cast of the logits to fp32,
// log_softmax over it, then softmax and a scaling pass in backward. These kernels read the bf16 logits once in
// forward and once in backward, and write the bf16 gradient once:
//   ce_forward:  lse_i = log sum_j exp(z_ij) (an online max/sum in fp32), loss_i = lse_i - z_{i,t_i};
//   ce_backward: dL/dz_ij = (exp(z_ij - lse_i) - [j = t_i]) * scale, rounded once to bf16.
// One block per row. csrc/common.cuh comes first.

// The running (max, sum of exp(x - max)) of one thread's share of a row.
__device__ __forceinline__ void push(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else if (x != neg_inf()) {  // -inf adds nothing (and -inf - -inf would be NaN); NaN passes through
        s += expf(x - m);
    }
}

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == neg_inf()) return;
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// The (max, sum) of the whole block, in every thread.
__device__ void block_reduce(float& m, float& s) {
    __shared__ float ms[THREADS / 32], ss[THREADS / 32];
    for (int o = 16; o > 0; o /= 2) merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        ms[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < THREADS / 32 ? ms[lane] : neg_inf();
    s = lane < THREADS / 32 ? ss[lane] : 0.0f;
    for (int o = 16; o > 0; o /= 2) merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
}

extern "C" __global__ void __launch_bounds__(THREADS) ce_forward(const bf16* __restrict__ logits,
                                                                 const i64* __restrict__ targets,
                                                                 float* __restrict__ lse_out,
                                                                 float* __restrict__ loss_out, int V) {
    const bf16* row = logits + (i64)blockIdx.x * V;
    float m = neg_inf(), s = 0.0f;
    int head = head_of(row, V);
    for (int j = threadIdx.x; j < head; j += THREADS) push(m, s, from_bf16(row[j]));
    int nvec = (V - head) / 8;
    const uint4* vrow = (const uint4*)(row + head);
#pragma unroll 4
    for (int k = threadIdx.x; k < nvec; k += THREADS) {
        uint4 w = vrow[k];
        unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            push(m, s, __uint_as_float(ws[q] << 16));
            push(m, s, __uint_as_float(ws[q] & 0xffff0000u));
        }
    }
    for (int j = head + nvec * 8 + threadIdx.x; j < V; j += THREADS) push(m, s, from_bf16(row[j]));
    block_reduce(m, s);
    if (threadIdx.x == 0) {
        float lse = m + logf(s);
        i64 t = targets[blockIdx.x];
        // A target outside the vocabulary makes the loss NaN, loudly, rather than reading out of bounds.
        float zt = (t >= 0 && t < V) ? from_bf16(row[t]) : nan_f();
        lse_out[blockIdx.x] = lse;
        loss_out[blockIdx.x] = lse - zt;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) ce_backward(const bf16* __restrict__ logits,
                                                                  const i64* __restrict__ targets,
                                                                  const float* __restrict__ lse,
                                                                  const float* __restrict__ scale,
                                                                  bf16* __restrict__ grad, int V) {
    const i64 r = blockIdx.x;
    const bf16* row = logits + r * V;
    bf16* out = grad + r * V;
    const float l = lse[r], sc = *scale;
    int head = head_of(row, V);
    int nvec = 0;
    if (head == head_of(out, V)) {  // same alignment: 16-byte loads and stores
        for (int j = threadIdx.x; j < head; j += THREADS) out[j] = (bf16)to_bf16(expf(from_bf16(row[j]) - l) * sc);
        nvec = (V - head) / 8;
        const uint4* vin = (const uint4*)(row + head);
        uint4* vout = (uint4*)(out + head);
#pragma unroll 4
        for (int k = threadIdx.x; k < nvec; k += THREADS) {
            uint4 w = vin[k];
            unsigned ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int q = 0; q < 4; q++) {
                unsigned lo = to_bf16(expf(__uint_as_float(ws[q] << 16) - l) * sc);
                unsigned hi = to_bf16(expf(__uint_as_float(ws[q] & 0xffff0000u) - l) * sc);
                ws[q] = lo | (hi << 16);
            }
            vout[k] = make_uint4(ws[0], ws[1], ws[2], ws[3]);
        }
    } else {
        head = 0;
    }
    for (int j = head + nvec * 8 + threadIdx.x; j < V; j += THREADS)
        out[j] = (bf16)to_bf16(expf(from_bf16(row[j]) - l) * sc);
    // The target's entry, p_t - 1, is formed in fp32 before rounding (rounding p_t first would lose the small
    // difference of a confident prediction). It overwrites the value written above, so the block waits first.
    __syncthreads();
    if (threadIdx.x == 0) {
        i64 t = targets[r];
        if (t >= 0 && t < V) out[t] = (bf16)to_bf16((expf(from_bf16(row[t]) - l) - 1.0f) * sc);
    }
}
