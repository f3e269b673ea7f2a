// What every kernel source shares; build.rs puts it in front of each csrc/*.cu before NVRTC sees it.
// No headers: bf16 is handled as its bits, and the rounding is c10::BFloat16's (to nearest, ties to even, NaN
// kept NaN), so a finite value or infinity rounds here exactly as libtorch rounds it (a NaN's bits may differ
// from those of libtorch's CUDA cast).

typedef unsigned short bf16;
typedef long long i64;
typedef unsigned long long u64;

// THREADS, the threads per block, comes from the compiler's command line (csrc/kernels.cpp's kThreads).

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }

__device__ __forceinline__ float from_bf16(unsigned bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ unsigned to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Elements before the first 16-byte boundary of `p` (a bf16 pointer, so its address is even), at most `n`.
__device__ __forceinline__ int head_of(const void* p, int n) {
    int h = (int)(((16u - ((unsigned)(u64)p & 15u)) & 15u) / 2u);
    return h < n ? h : n;
}
