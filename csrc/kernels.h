// Tessera's own CUDA kernels (csrc/kernels.cpp), as shim.cpp calls them. Each throws (TORCH_CHECK) on bad
// input, on a host without CUDA or NVRTC, and on a compile or launch failure, naming the problem.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <tuple>
#include <utility>
#include <vector>

// `(lse, loss)`, each (N) fp32: the log-sum-exp of every row of bf16 CUDA `logits (N, V)` and its
// cross-entropy against `targets (N)` int64.
std::pair<at::Tensor, at::Tensor> tessera_ce_forward_kernel(const at::Tensor& logits, const at::Tensor& targets);

// The gradient of `scale` times the summed cross-entropy with respect to the logits, in bf16; `scale` is a
// 1-element fp32 tensor on the logits' device (the incoming gradient over N), read by the kernel, not the host.
at::Tensor tessera_ce_backward_kernel(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                      const at::Tensor& scale);

// `(s, h, mean, rstd)` for `x (..., C)` fp32, `y` of its shape in bf16 and the LayerNorm's `w`, `b` (C) fp32 on
// CUDA: s = x + y (fp32), h = LayerNorm(s) (bf16), both of x's shape, and each of the N rows' mean and 1/std
// (N) fp32 for backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tessera_add_ln_forward_kernel(const at::Tensor& x,
                                                                                         const at::Tensor& y,
                                                                                         const at::Tensor& w,
                                                                                         const at::Tensor& b,
                                                                                         double eps);

// `(dx, dy, dw, db)` from the gradients of h (bf16; must be defined) and of s (fp32; undefined when s fed
// nothing else), all of s's shape, with what forward saved. dx is fp32 and dy the same values in bf16.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tessera_add_ln_backward_kernel(
    const at::Tensor& dh, const at::Tensor& ds, const at::Tensor& s, const at::Tensor& w, const at::Tensor& mean,
    const at::Tensor& rstd);

// The 2-norm of all `grads` taken together (contiguous fp32 or bf16 CUDA tensors), as a 0-d fp32 tensor: each block's
// sum of squares, then their sum in double, in a fixed order. No host sync.
at::Tensor tessera_grad_norm_kernel(const std::vector<at::Tensor>& grads);

// One AdamW update (the step number `step` counts from 1) of the flat fp32 `params` and its moments, from
// `grads` that tile it in order (`offsets[i]`: where `grads[i]` starts). Elements before `decay_len` are
// weight-decayed. With `max_norm > 0`, each gradient is clipped by the global norm `norm` (one fp32 element on
// the device) as it is read; the gradients (fp32 or bf16) are not written. `shadow` (may be undefined): bf16
// copies of the first `shadow.numel()` parameters, written with their new values. The parameters' version
// counter moves on, as after an in-place op.
void tessera_adamw_kernel(const at::Tensor& params, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                          const std::vector<at::Tensor>& grads, const std::vector<int64_t>& offsets, int64_t decay_len,
                          double lr, double beta1, double beta2, double weight_decay, double eps, int64_t step,
                          const at::Tensor& norm, double max_norm, const at::Tensor& shadow);

// Compiles every kernel for sm_<major><minor> with NVRTC (no GPU needed) and returns the cubins' total size;
// the NVRTC version goes to `version` as major * 10 + minor.
size_t tessera_kernels_compile_check(int major, int minor, int* version);
