// A few libtorch calls that tch 0.24 does not wrap. Kept tiny: each function is a C entry point with no
// exceptions crossing the boundary (every call is wrapped and reports failure by return value).
#include <ATen/autocast_mode.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

extern "C" {

// Makes CUDA autocast (which tch turns on with `tch::autocast`) use bfloat16 instead of libtorch's default
// float16. Returns 0 on success.
int tessera_set_cuda_autocast_bf16() {
    try {
        at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, c10::kBFloat16);
        return 0;
    } catch (...) {
        return 1;
    }
}

// The dtype CUDA autocast will use, as c10::ScalarType's integer value (5 = Half, 15 = BFloat16).
int tessera_cuda_autocast_dtype() {
    try {
        return static_cast<int>(at::autocast::get_autocast_dtype(c10::DeviceType::CUDA));
    } catch (...) {
        return -1;
    }
}

}
