// A residual add fused with the LayerNorm after it, for a pre-LN transformer's residual stream under bf16
// autocast: x is the fp32 stream, y a sublayer's bf16 output, and
//   s = x + y (fp32, the new stream),  h = (s - mean) * rstd * w + b  (bf16, the next sublayer's input).
//
// In libtorch's ops this is an add, a LayerNorm in fp32 and autocast's cast to bf16: the (N, C) tensor is read or
// written about eleven times forward and backward, counting the casts of the gradients. Here forward reads x
// and y and writes s and h once each; backward reads dh, ds and s and writes dx and dy in one kernel, and a
// second kernel reads dh and s again for the weight's and bias's gradients (partial sums per group of rows,
// which libtorch adds up: the same order every run).
//
// csrc/common.cuh comes first.

// The sums of `a` and `b` over the block, in every thread.
__device__ void block_sum2(float& a, float& b) {
    __shared__ float sa[THREADS / 32], sb[THREADS / 32];
    for (int o = 16; o > 0; o /= 2) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // an earlier call's threads may still be reading the arrays
    if (lane == 0) {
        sa[warp] = a;
        sb[warp] = b;
    }
    __syncthreads();
    a = lane < THREADS / 32 ? sa[lane] : 0.0f;
    b = lane < THREADS / 32 ? sb[lane] : 0.0f;
    for (int o = 16; o > 0; o /= 2) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
}

// One block per row: s and h, and the row's mean and 1/std for backward. The variance is taken about the
// mean in a second pass over s (which this thread wrote itself, so it reads back from cache).
extern "C" __global__ void __launch_bounds__(THREADS) add_ln_forward(
    const float* __restrict__ x, const bf16* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b,
    float* __restrict__ s, bf16* __restrict__ h, float* __restrict__ mean_out, float* __restrict__ rstd_out, int C,
    float eps) {
    const i64 r = blockIdx.x;
    const float* xr = x + r * C;
    const bf16* yr = y + r * C;
    float* sr = s + r * C;
    bf16* hr = h + r * C;
    float sum = 0.0f, none = 0.0f;
    for (int j = threadIdx.x; j < C; j += THREADS) {
        float v = xr[j] + from_bf16(yr[j]);
        sr[j] = v;
        sum += v;
    }
    block_sum2(sum, none);
    const float mean = sum / C;
    float sq = 0.0f;
    for (int j = threadIdx.x; j < C; j += THREADS) {
        float d = sr[j] - mean;
        sq += d * d;
    }
    block_sum2(sq, none);
    const float rstd = rsqrtf(sq / C + eps);
    for (int j = threadIdx.x; j < C; j += THREADS) hr[j] = (bf16)to_bf16((sr[j] - mean) * rstd * w[j] + b[j]);
    if (threadIdx.x == 0) {
        mean_out[r] = mean;
        rstd_out[r] = rstd;
    }
}

// One block per row: with g = dh * w and xhat = (s - mean) * rstd,
//   dx = ds + rstd * (g - mean(g) - xhat * mean(g * xhat))  (fp32), and dy, the same rounded to bf16.
// `ds` may be null: s feeds nothing but this LayerNorm (the model's last).
extern "C" __global__ void __launch_bounds__(THREADS) add_ln_backward(
    const bf16* __restrict__ dh, const float* __restrict__ ds, const float* __restrict__ s,
    const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
    float* __restrict__ dx, bf16* __restrict__ dy, int C) {
    const i64 r = blockIdx.x;
    const bf16* dhr = dh + r * C;
    const float* sr = s + r * C;
    const float mu = mean[r], rs = rstd[r];
    float gx = 0.0f, g_sum = 0.0f;
    for (int j = threadIdx.x; j < C; j += THREADS) {
        float g = from_bf16(dhr[j]) * w[j];
        gx += g * ((sr[j] - mu) * rs);
        g_sum += g;
    }
    block_sum2(gx, g_sum);
    const float mean_gx = gx / C, mean_g = g_sum / C;
    for (int j = threadIdx.x; j < C; j += THREADS) {
        float g = from_bf16(dhr[j]) * w[j];
        float d = rs * (g - mean_g - (sr[j] - mu) * rs * mean_gx);
        if (ds != nullptr) d += ds[r * C + j];
        dx[r * C + j] = d;
        dy[r * C + j] = (bf16)to_bf16(d);
    }
}

// The weight's and bias's gradients in parts: sum over rows of dh * xhat and of dh. The grid is `tiles` tiles
// of 32 columns times some groups of rows; block k takes tile k % tiles and every (groups * 8)-th row from
// group k / tiles, its 8 warps 8 rows apart, and writes its group's partial sums to row `group` of
// dw_part and db_part, (groups, C) each.
extern "C" __global__ void __launch_bounds__(THREADS) add_ln_backward_wb(
    const bf16* __restrict__ dh, const float* __restrict__ s, const float* __restrict__ mean,
    const float* __restrict__ rstd, float* __restrict__ dw_part, float* __restrict__ db_part, i64 N, int C,
    int tiles) {
    const int tile = blockIdx.x % tiles, group = blockIdx.x / tiles, groups = gridDim.x / tiles;
    const int c = threadIdx.x % 32, lane = threadIdx.x / 32, col = tile * 32 + c;
    float aw = 0.0f, ab = 0.0f;
    if (col < C) {
        for (i64 r = (i64)group * (THREADS / 32) + lane; r < N; r += (i64)groups * (THREADS / 32)) {
            float g = from_bf16(dh[r * C + col]);
            aw += g * ((s[r * C + col] - mean[r]) * rstd[r]);
            ab += g;
        }
    }
    __shared__ float pw[THREADS / 32][32], pb[THREADS / 32][32];
    pw[lane][c] = aw;
    pb[lane][c] = ab;
    __syncthreads();
    if (lane == 0 && col < C) {
        float tw = 0.0f, tb = 0.0f;
        for (int k = 0; k < THREADS / 32; k++) {
            tw += pw[k][c];
            tb += pb[k][c];
        }
        dw_part[(i64)group * C + col] = tw;
        db_part[(i64)group * C + col] = tb;
    }
}
