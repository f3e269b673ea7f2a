// Runs csrc/cross_entropy.cu, csrc/layer_norm.cu and csrc/adamw.cu on the CPU, one std::thread per CUDA thread, and checks
// every output against a double-precision reference computed here. Built and run by the test in src/shim.rs:
//
//   c++ -std=c++20 -pthread -O1 -I csrc tests/kernels/emulate.cpp -o emulate && ./emulate
//
// What it proves: the kernels' arithmetic (the online max/sum, the block reductions, bf16 rounding, the
// target's entry, LayerNorm's forward and backward) and their indexing (the unaligned head, 16-byte body and
// tail of each row, rows of every alignment, a gradient buffer aligned differently from the logits, column
// tiles wider than the tensor, row groups that do not divide the rows). What it cannot: the launch through the
// CUDA driver, which `tessera doctor` checks on a GPU. For the optimizer's kernels it also runs the host code that
// cuts the gradient pieces into launches (csrc/piece_table.h). Exit status 0 when every check passes.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

// --- just enough CUDA for the kernels ---------------------------------------------------------------------
struct alignas(16) uint4 {  // aligned as CUDA's, so that -fsanitize=alignment traps a misaligned vector access
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 gridDim;
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// One block runs at a time, so `static` serves as `__shared__`.
#define __shared__ static
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)

std::barrier<>* block_barrier;
std::barrier<>* warp_barrier[32];
float lanes[32][32];

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    lanes[warp][lane] = v;
    warp_barrier[warp]->arrive_and_wait();
    float r = lanes[warp][lane ^ offset];
    warp_barrier[warp]->arrive_and_wait();
    return r;
}

#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#define THREADS 256  // as csrc/kernels.cpp passes it to NVRTC
#include "common.cuh"
#include "cross_entropy.cu"
#include "layer_norm.cu"
#include "adamw.cu"
#include "piece_table.h"

#include <cstddef>

// The host's table is the kernel's parameter, byte for byte.
static_assert(sizeof(Pieces) == sizeof(tessera_kernels::PieceTable));
static_assert(offsetof(Pieces, offset) == offsetof(tessera_kernels::PieceTable, offset));
static_assert(offsetof(Pieces, numel) == offsetof(tessera_kernels::PieceTable, numel));
static_assert(offsetof(Pieces, first_block) == offsetof(tessera_kernels::PieceTable, first_block));
static_assert(offsetof(Pieces, bf16) == offsetof(tessera_kernels::PieceTable, bf16));
static_assert(offsetof(Pieces, count) == offsetof(tessera_kernels::PieceTable, count));
static_assert(sizeof(AdamwHyper) == 28 && offsetof(AdamwHyper, step) == 20 && offsetof(AdamwHyper, max_norm) == 24);

// Runs `kernel` on `blocks` blocks of THREADS threads, a block at a time.
void launch(int blocks, const std::function<void()>& kernel) {
    gridDim.x = blocks;
    for (int b = 0; b < blocks; b++) {
        std::barrier<> block(THREADS);
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        for (int w = 0; w < THREADS / 32; w++) {
            warps.push_back(std::make_unique<std::barrier<>>(32));
            warp_barrier[w] = warps.back().get();
        }
        block_barrier = &block;
        std::vector<std::thread> threads;
        for (int t = 0; t < THREADS; t++)
            threads.emplace_back([&, t] {
                threadIdx.x = t;
                blockIdx.x = b;
                kernel();
            });
        for (auto& t : threads) t.join();
    }
}

// --- the reference ----------------------------------------------------------------------------------------
float bf16_value(unsigned short b) { return __uint_as_float(unsigned(b) << 16); }

// c10::BFloat16's rounding, written out independently of the kernel's.
unsigned short round_bf16(float f) {
    if (std::isnan(f)) return 0x7fc0;
    uint32_t u = __float_as_uint(f);
    return uint16_t((u + ((u >> 16) & 1) + 0x7fff) >> 16);
}

int failures = 0;
#define CHECK(cond, ...)                     \
    do {                                     \
        if (!(cond)) {                       \
            std::fprintf(stderr, __VA_ARGS__); \
            std::fprintf(stderr, "\n");      \
            failures++;                      \
        }                                    \
    } while (0)

// One case: `n` rows of `v` logits; `shift` bf16 elements of offset of the logits (and `gshift` of the
// gradient) from a 16-byte boundary.
void run_case(int n, int v, int shift, int gshift, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<unsigned short> logit_buf(n * v + 16), grad_buf(n * v + 16);
    auto* base = reinterpret_cast<unsigned short*>((reinterpret_cast<uintptr_t>(logit_buf.data()) + 15) & ~uintptr_t(15));
    auto* gbase = reinterpret_cast<unsigned short*>((reinterpret_cast<uintptr_t>(grad_buf.data()) + 15) & ~uintptr_t(15));
    unsigned short* logits = base + shift;
    unsigned short* grad = gbase + gshift;
    for (int i = 0; i < n * v; i++) logits[i] = round_bf16(normal(rng));
    if (v > 3) {
        logits[1] = round_bf16(-INFINITY);  // a masked-out logit contributes nothing
        logits[v + 2] = round_bf16(80.0f);  // exp(80) overflows fp32 without the running max
    }
    std::vector<long long> targets(n);
    for (int i = 0; i < n; i++) targets[i] = (long long)(rng() % v);
    targets[0] = v > 3 ? 2 : 0;
    if (n > 1) targets[1] = 2 % v;  // row 1's target is the 80: a confident prediction, p_t - 1 near zero
    std::vector<float> lse(n), loss(n);
    const float scale = 1.0f / float(n);

    launch(n, [&] { ce_forward(logits, targets.data(), lse.data(), loss.data(), v); });
    launch(n, [&] { ce_backward(logits, targets.data(), lse.data(), &scale, grad, v); });

    for (int i = 0; i < n; i++) {
        const unsigned short* row = logits + (size_t)i * v;
        double m = -INFINITY;
        for (int j = 0; j < v; j++) m = std::fmax(m, bf16_value(row[j]));
        double s = 0;
        for (int j = 0; j < v; j++) s += std::exp(double(bf16_value(row[j])) - m);
        double ref_lse = m + std::log(s);
        double ref_loss = ref_lse - bf16_value(row[targets[i]]);
        CHECK(std::fabs(lse[i] - ref_lse) <= 1e-5 * std::fmax(1.0, std::fabs(ref_lse)),
              "n=%d v=%d shift=%d row %d: lse %.8f, reference %.8f", n, v, shift, i, lse[i], ref_lse);
        CHECK(std::fabs(loss[i] - ref_loss) <= 1e-5 * std::fmax(1.0, std::fabs(ref_loss)),
              "n=%d v=%d shift=%d row %d: loss %.8f, reference %.8f", n, v, shift, i, loss[i], ref_loss);
        for (int j = 0; j < v; j++) {
            double p = std::exp(double(bf16_value(row[j])) - ref_lse);
            double ref = (p - (j == targets[i] ? 1.0 : 0.0)) * scale;
            float got = bf16_value(grad[(size_t)i * v + j]);
            // One rounding to bf16 (8 significant bits) of a value computed in fp32.
            double tol = std::fabs(ref) / 256.0 + 1e-6 * std::fabs(ref) + 1e-30;
            CHECK(std::fabs(got - ref) <= tol, "n=%d v=%d shift=%d gshift=%d grad[%d][%d] = %.9g, reference %.9g",
                  n, v, shift, gshift, i, j, got, ref);
        }
    }
}

// Add + LayerNorm on `n` rows of `c`; `with_ds`: s also feeds something else (its gradient is added);
// `groups`: row groups of the weight-gradient kernel.
void run_layer_norm(int n, int c, bool with_ds, int groups, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(n * c), w(c), b(c), s(n * c), mean(n), rstd(n), ds(n * c), dx(n * c);
    std::vector<unsigned short> y(n * c), h(n * c), dh(n * c), dy(n * c);
    for (int i = 0; i < n * c; i++) {
        x[i] = 2.0f * normal(rng) + 5.0f;  // an offset mean, which the normalisation must remove
        y[i] = round_bf16(normal(rng));
        dh[i] = round_bf16(normal(rng));
        ds[i] = normal(rng);
    }
    for (int j = 0; j < c; j++) {
        w[j] = 1.0f + 0.1f * normal(rng);
        b[j] = 0.1f * normal(rng);
    }
    const float eps = 1e-5f;
    launch(n, [&] { add_ln_forward(x.data(), y.data(), w.data(), b.data(), s.data(), h.data(), mean.data(), rstd.data(), c, eps); });
    launch(n, [&] { add_ln_backward(dh.data(), with_ds ? ds.data() : nullptr, s.data(), w.data(), mean.data(), rstd.data(), dx.data(), dy.data(), c); });
    int tiles = (c + 31) / 32;
    std::vector<float> dw_part(groups * c, NAN), db_part(groups * c, NAN);
    launch(groups * tiles, [&] { add_ln_backward_wb(dh.data(), s.data(), mean.data(), rstd.data(), dw_part.data(), db_part.data(), n, c, tiles); });

    std::vector<double> dw_ref(c, 0.0), db_ref(c, 0.0);
    for (int i = 0; i < n; i++) {
        double mu = 0, var = 0;
        for (int j = 0; j < c; j++) {
            float sv = x[i * c + j] + bf16_value(y[i * c + j]);  // one fp32 add, as the kernel's
            CHECK(s[i * c + j] == sv, "c=%d s[%d][%d] = %.9g, x + y = %.9g", c, i, j, s[i * c + j], sv);
            mu += sv;
        }
        mu /= c;
        for (int j = 0; j < c; j++) var += (s[i * c + j] - mu) * (s[i * c + j] - mu);
        var /= c;
        double rs = 1.0 / std::sqrt(var + eps);
        CHECK(std::fabs(mean[i] - mu) <= 1e-5 * std::fabs(mu) && std::fabs(rstd[i] - rs) <= 1e-5 * rs,
              "c=%d row %d: mean %.8f rstd %.8f, reference %.8f %.8f", c, i, mean[i], rstd[i], mu, rs);
        double gx = 0, g_sum = 0;
        for (int j = 0; j < c; j++) {
            double xhat = (s[i * c + j] - mu) * rs;
            double ref = xhat * w[j] + b[j];
            float got = bf16_value(h[i * c + j]);
            CHECK(std::fabs(got - ref) <= std::fabs(ref) / 256.0 + 1e-5, "c=%d h[%d][%d] = %.9g, reference %.9g", c, i, j, got, ref);
            double g = bf16_value(dh[i * c + j]) * double(w[j]);
            gx += g * xhat;
            g_sum += g;
            dw_ref[j] += bf16_value(dh[i * c + j]) * xhat;
            db_ref[j] += bf16_value(dh[i * c + j]);
        }
        for (int j = 0; j < c; j++) {
            double xhat = (s[i * c + j] - mu) * rs;
            double g = bf16_value(dh[i * c + j]) * double(w[j]);
            double ref = rs * (g - g_sum / c - xhat * gx / c) + (with_ds ? ds[i * c + j] : 0.0);
            CHECK(std::fabs(dx[i * c + j] - ref) <= 1e-4 * (1.0 + std::fabs(ref)), "c=%d dx[%d][%d] = %.9g, reference %.9g",
                  c, i, j, dx[i * c + j], ref);
            CHECK(dy[i * c + j] == round_bf16(dx[i * c + j]), "c=%d dy[%d][%d] is not dx rounded to bf16", c, i, j);
        }
    }
    for (int j = 0; j < c; j++) {
        double dw = 0, db = 0;
        for (int g = 0; g < groups; g++) {
            dw += dw_part[g * c + j];
            db += db_part[g * c + j];
        }
        CHECK(std::fabs(dw - dw_ref[j]) <= 1e-4 * (1.0 + std::fabs(dw_ref[j])) &&
                  std::fabs(db - db_ref[j]) <= 1e-4 * (1.0 + std::fabs(db_ref[j])),
              "c=%d groups=%d column %d: dw %.9g db %.9g, reference %.9g %.9g", c, groups, j, dw, db, dw_ref[j], db_ref[j]);
    }
}

// AdamW at step 3 over gradient pieces of `sizes`, elements before `decay_len` decayed, clipped to norm 1 when
// `clip`: the norm from sum_squares and the update from adamw_update, launched table by table as
// csrc/kernels.cpp does, against a double-precision AdamW. With `bf16`, every other piece is bf16; with
// `shadow_len > 0`, the kernel also writes bf16 copies of the first `shadow_len` parameters.
void run_adamw(const std::vector<int64_t>& sizes, int64_t decay_len, bool clip, bool bf16, int64_t shadow_len,
               uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<std::vector<float>> grads;
    std::vector<std::vector<unsigned short>> grads16(sizes.size());
    std::vector<tessera_kernels::PieceRef> refs;
    int64_t numel = 0;
    for (size_t k = 0; k < sizes.size(); k++) {
        int64_t n = sizes[k];
        grads.emplace_back(n);
        for (auto& g : grads.back()) g = normal(rng);
        if (bf16 && k % 2 == 1) {
            grads16[k].resize(n);
            for (int64_t i = 0; i < n; i++) {
                grads16[k][i] = round_bf16(grads[k][i]);
                grads[k][i] = bf16_value(grads16[k][i]);  // the reference reads the bf16 value
            }
            refs.push_back({reinterpret_cast<uint64_t>(grads16[k].data()), numel, n, true});
        } else {
            refs.push_back({reinterpret_cast<uint64_t>(grads[k].data()), numel, n, false});
        }
        numel += n;
    }
    const auto saved = grads;
    const auto saved16 = grads16;
    std::vector<unsigned short> shadow(shadow_len, 0xffff);
    std::vector<float> p(numel), m(numel), v(numel);
    for (int64_t i = 0; i < numel; i++) {
        p[i] = normal(rng);
        m[i] = 0.01f * normal(rng);
        v[i] = 1e-4f * std::fabs(normal(rng));
    }
    const auto p0 = p, m0 = m, v0 = v;
    const auto tables = tessera_kernels::piece_tables(refs, CHUNK);
    auto table = [](const tessera_kernels::PieceTable& t) {
        Pieces k;
        std::memcpy(&k, &t, sizeof k);
        return k;
    };

    // The norm: every block's sum of squares, then their sum in double.
    std::vector<float> partial;
    for (const auto& [t, blocks] : tables) {
        size_t first = partial.size();
        partial.resize(first + blocks, NAN);
        Pieces k = table(t);
        launch(int(blocks), [&] { sum_squares(k, partial.data() + first); });
    }
    double sq = 0, ref_sq = 0;
    for (float x : partial) sq += x;
    for (const auto& g : grads)
        for (float x : g) ref_sq += double(x) * x;
    float norm = float(std::sqrt(sq));
    CHECK(std::fabs(norm - std::sqrt(ref_sq)) <= 1e-5 * std::sqrt(ref_sq), "pieces=%zu: norm %.8g, reference %.8g",
          sizes.size(), norm, std::sqrt(ref_sq));

    const double lr = 1e-2, b1 = 0.9, b2 = 0.95, wd = 0.1, eps = 1e-8;
    const int64_t step = 3;
    AdamwHyper h{float(lr), float(b1), float(b2), float(wd), float(eps), float(step), clip ? 1.0f : 0.0f};
    for (const auto& [t, blocks] : tables) {
        Pieces k = table(t);
        launch(int(blocks), [&] {
            adamw_update(k, p.data(), m.data(), v.data(), clip ? &norm : nullptr, decay_len,
                         shadow_len > 0 ? shadow.data() : nullptr, shadow_len, h);
        });
    }

    const double scale = clip ? std::fmax((double(norm) + 1e-6) / 1.0, 1.0) : 1.0;
    int64_t i = 0;
    for (size_t k = 0; k < grads.size(); k++) {
        CHECK(grads[k] == saved[k] && grads16[k] == saved16[k], "pieces=%zu: gradient piece %zu was written",
              sizes.size(), k);
        for (float graw : grads[k]) {
            double g = graw / scale;
            double rp = p0[i], rm = b1 * m0[i] + (1 - b1) * g, rv = b2 * v0[i] + (1 - b2) * g * g;
            if (i < decay_len) rp *= 1 - lr * wd;
            double bias1 = 1 - std::pow(b1, double(step)), bias2 = 1 - std::pow(b2, double(step));
            double update = lr / bias1 * rm / (std::sqrt(rv) / std::sqrt(bias2) + eps);
            double tp = 1e-6 * (std::fabs(rp) + std::fabs(update));
            rp -= update;
            // Float roundings of the terms (the clipped gradient is rounded to fp32, as libtorch's kernel does),
            // so relative to the terms rather than to a result that may cancel.
            double tm = 1e-6 * (b1 * std::fabs(m0[i]) + (1 - b1) * std::fabs(g)), tv = 1e-6 * rv;
            CHECK(std::fabs(p[i] - rp) <= tp && std::fabs(m[i] - rm) <= tm &&
                      std::fabs(v[i] - rv) <= tv,
                  "pieces=%zu clip=%d element %lld (decayed %d): p m v = %.9g %.9g %.9g, reference %.9g %.9g %.9g",
                  sizes.size(), int(clip), (long long)i, int(i < decay_len), p[i], m[i], v[i], rp, rm, rv);
            i++;
        }
    }
    for (int64_t j = 0; j < shadow_len; j++)
        CHECK(shadow[j] == round_bf16(p[j]), "pieces=%zu: bf16 copy %lld is %#x, its parameter %.9g rounds to %#x",
              sizes.size(), (long long)j, shadow[j], p[j], round_bf16(p[j]));
}

int main() {
    // The kernel's rounding against c10's, on edge values.
    const float edges[] = {0.0f, -0.0f, 1.0f, 1.00390625f, 1.005859375f, 3.4e38f, -3.4e38f, INFINITY, -INFINITY,
                           NAN, 1e-40f, 2.5f, -7.123456f};
    for (float f : edges) CHECK(to_bf16(f) == round_bf16(f), "to_bf16(%g) = %#x, c10 gives %#x", f, to_bf16(f), round_bf16(f));

    // Vocabulary sizes: smaller than one 16-byte vector, odd (rows start at every alignment), a multiple of 8,
    // and GPT-2's own 50257.
    struct Case {
        int n, v, shift, gshift;
    };
    const Case cases[] = {{3, 5, 0, 0},   {4, 7, 3, 3},      {5, 1003, 0, 0}, {5, 1003, 1, 1},
                          {4, 1024, 0, 0}, {4, 1024, 2, 5},   {3, 1003, 1, 2}, {2, 50257, 0, 0}};
    uint64_t seed = 1;
    for (const auto& c : cases) run_case(c.n, c.v, c.shift, c.gshift, seed++);

    // A target outside the vocabulary gives a NaN loss instead of a read out of bounds, and leaves the
    // gradient without a -1 entry.
    {
        std::vector<unsigned short> logits(16, round_bf16(0.5f));
        long long bad = 16;
        float lse = 0, loss = 0;
        launch(1, [&] { ce_forward(logits.data(), &bad, &lse, &loss, 16); });
        CHECK(std::isnan(loss) && std::fabs(lse - (0.5 + std::log(16.0))) < 1e-6, "out-of-range target: loss %g, lse %g",
              loss, lse);
    }
    // LayerNorm widths: under one warp, not a multiple of 32 (a partial column tile), GPT-2 small's 768; rows that
    // one group covers, and groups that do not divide the rows.
    run_layer_norm(5, 20, true, 1, 11);
    run_layer_norm(37, 100, true, 3, 12);
    run_layer_norm(9, 768, false, 2, 13);
    run_layer_norm(16, 1000, true, 4, 14);

    // AdamW: pieces from one element to several blocks (CHUNK is 8192), more of them than one launch takes
    // (48), an empty one, the decay boundary inside a piece; with and without clipping.
    std::vector<int64_t> sizes;
    for (int i = 0; i < 60; i++) sizes.push_back(std::vector<int64_t>{1, 7, 255, 256, 257, 1000}[i % 6] + i);
    sizes.insert(sizes.begin() + 3, {8191, 8192, 8193, 0, 20000});
    run_adamw(sizes, 8192 + 77, true, false, 0, 21);
    run_adamw(sizes, 0, false, false, 0, 22);
    run_adamw({5}, 5, true, false, 0, 23);
    // bf16 gradient pieces (of bf16 weight copies) among fp32 ones, and the copies written for a prefix that
    // ends inside a piece.
    run_adamw(sizes, 8192 + 77, true, true, 8192 + 500, 24);
    int64_t total = 0;
    for (int64_t n : sizes) total += n;
    run_adamw(sizes, 0, false, true, total, 25);  // every parameter copied, to the last element of the last piece

    if (failures == 0) std::printf("ok: every check passed\n");
    return failures == 0 ? 0 : 1;
}
