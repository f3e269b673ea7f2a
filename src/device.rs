//! Choosing the device, and making CUDA reachable from one binary that also runs on CPU-only hosts.
//!
//! The linker drops `libtorch_cuda.so` from the binary's needed libraries (no symbol in it is referenced
//! directly), so libtorch would report CUDA as unavailable. When a CUDA device is asked for we `dlopen` it
//! with `RTLD_GLOBAL`, which registers libtorch's CUDA backend; CPU runs never touch it.

use crate::config::DeviceSpec;
use std::ffi::CString;
use tch::Device;

extern "C" {
    fn tessera_set_cuda_autocast_bf16() -> i32;
    fn tessera_cuda_autocast_dtype() -> i32;
}

/// Why the requested device cannot be used. Fatal for the run: fix the config or the host.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device {spec:?} was requested but CUDA is not available: {reason}; use device = \"cpu\" or run on a CUDA host"
    )]
    CudaUnavailable { spec: String, reason: String },
    #[error("device cuda:{index} was requested but this host has {count} CUDA device(s)")]
    NoSuchGpu { index: usize, count: usize },
    #[error("could not switch CUDA autocast to bfloat16")]
    Autocast,
    /// The model's state alone does not fit the device's memory (the user's to fix: permanent).
    #[error(
        "{what} needs {need_gb:.1} GB for its weights, gradients and AdamW state alone, and {device} has {have_gb:.1} GB \
         {kind}: choose a smaller model (`tessera presets`), more ranks with train.zero = 1 or 2, or a larger device"
    )]
    TooLarge { what: String, need_gb: f64, device: String, have_gb: f64, kind: &'static str },
}

/// Bytes of memory the system can give a new allocation now (`MemAvailable`), if known.
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Refuses model `name` of `n_params` parameters when its state cannot fit `device`, before anything is
/// allocated (libtorch would fail deep inside initialisation instead): fp32 weights and gradients, and
/// AdamW's two moments cut over `optimizer_shards` ranks (ZeRO). Activations come on top, so passing this is
/// necessary, not sufficient (out of memory in a step is `micro_batch = "auto"`'s).
///
/// # Errors
/// [`DeviceError::TooLarge`].
pub fn check_fits(name: &str, n_params: u64, optimizer_shards: u64, device: Device) -> Result<(), DeviceError> {
    let what = format!("{name} ({} parameters)", crate::plan::count(n_params as f64));
    let state_bytes = n_params * 8 + (n_params * 8).div_ceil(optimizer_shards.max(1));
    let (name, have, kind) = match device {
        Device::Cuda(i) => match describe(device) {
            Some((name, total)) => (format!("{name} (cuda:{i})"), total, "in all"),
            None => return Ok(()),
        },
        _ => match host_available_bytes() {
            Some(avail) => ("this machine".to_string(), avail, "available"),
            None => return Ok(()),
        },
    };
    if state_bytes > have {
        return Err(DeviceError::TooLarge {
            what,
            need_gb: state_bytes as f64 / 1e9,
            device: name,
            have_gb: have as f64 / 1e9,
            kind,
        });
    }
    Ok(())
}

/// Loads libtorch's CUDA backend if it is not loaded yet. Returns why not, if it cannot be loaded.
fn load_cuda_backend() -> Result<(), String> {
    let candidates = ["libtorch_cuda.so".to_string(), format!("{}/libtorch_cuda.so", env!("TESSERA_LIBTORCH_LIB"))];
    let mut errors = vec![];
    for name in candidates {
        let c = CString::new(name.clone()).expect("no NUL in library name");
        // SAFETY: dlopen with a valid C string; the handle is intentionally kept open for the process's life.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            return Ok(());
        }
        // SAFETY: dlerror returns a thread-local C string or null.
        let err = unsafe { libc::dlerror() };
        if !err.is_null() {
            errors.push(unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned());
        }
    }
    Err(errors.join("; "))
}

/// Resolves a device spec to a libtorch device, loading CUDA support when needed. `Auto` picks CUDA 0 when
/// it can be loaded and a GPU is present, the CPU otherwise.
///
/// # Errors
/// [`DeviceError`] when CUDA was asked for explicitly and cannot be used.
pub fn resolve(spec: DeviceSpec) -> Result<Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => {
            if load_cuda_backend().is_ok() && tch::Cuda::is_available() {
                enable_bf16_autocast()?;
                Ok(Device::Cuda(0))
            } else {
                Ok(Device::Cpu)
            }
        }
        DeviceSpec::Cuda(index) => {
            let name = format!("cuda:{index}");
            load_cuda_backend().map_err(|reason| DeviceError::CudaUnavailable { spec: name.clone(), reason })?;
            if !tch::Cuda::is_available() {
                return Err(DeviceError::CudaUnavailable { spec: name, reason: "no CUDA device found".into() });
            }
            let count = tch::Cuda::device_count() as usize;
            if index >= count {
                return Err(DeviceError::NoSuchGpu { index, count });
            }
            enable_bf16_autocast()?;
            Ok(Device::Cuda(index))
        }
    }
}

/// Makes CUDA autocast ([`crate::shim::cuda_autocast`]) use bfloat16 (tch's default is float16), and lets whatever matmuls stay in
/// fp32 use TF32 tensor cores (`torch.set_float32_matmul_precision("high")`).
fn enable_bf16_autocast() -> Result<(), DeviceError> {
    // SAFETY: plain C functions of our shim, no arguments, exceptions caught on the C++ side.
    let ok = unsafe { tessera_set_cuda_autocast_bf16() } == 0
        && unsafe { tessera_cuda_autocast_dtype() } == 15
        && crate::shim::set_tf32(true).is_ok();
    if ok {
        Ok(())
    } else {
        Err(DeviceError::Autocast)
    }
}

/// The dtype CUDA autocast currently uses, as c10's ScalarType number (5 = Half, 15 = BFloat16).
pub fn cuda_autocast_dtype() -> i32 {
    // SAFETY: as above.
    unsafe { tessera_cuda_autocast_dtype() }
}

/// Hands the CUDA caching allocator's unused memory back (after an out-of-memory, before a retry). Does
/// nothing on CPU-only hosts; an error from libtorch is reported and otherwise ignored, since freeing the
/// cache is an optimisation, not a condition of correctness.
pub fn empty_cache() {
    if tch::Cuda::is_available() {
        if let Err(e) = crate::shim::cuda_empty_cache() {
            crate::say!("tessera: warning: could not empty the CUDA cache: {e}");
        }
    }
}

/// Peak bytes allocated by libtorch on `device` since the last [`reset_peak_memory`]; `None` on the CPU,
/// where libtorch keeps no such statistic.
pub fn peak_memory(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(i) => crate::shim::cuda_peak_allocated(i).ok(),
        _ => None,
    }
}

/// Starts a new peak for [`peak_memory`].
pub fn reset_peak_memory(device: Device) {
    if let Device::Cuda(i) = device {
        let _ = crate::shim::cuda_reset_peak(i);
    }
}

/// A device's name and memory in bytes (`None` for the CPU).
pub fn describe(device: Device) -> Option<(String, u64)> {
    match device {
        Device::Cuda(i) => crate::shim::cuda_device_info(i).ok(),
        _ => None,
    }
}

/// Dense bf16 tensor-core peak in TFLOP/s of a GPU, from its name, for MFU ([`crate::plan::GPUS`], the
/// planner's table). `None` for a card not in the table (give `--peak-tflops`).
pub fn peak_bf16_tflops(name: &str) -> Option<f64> {
    crate::plan::gpu_for_device(name).map(|g| g.peak_flops / 1e12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shim_switches_cuda_autocast_from_fp16_to_bf16_even_without_a_gpu() {
        // libtorch's default CUDA autocast dtype is Half (5); the shim sets BFloat16 (15). The setting is
        // libtorch state of this thread (every autocast region sets it too), so this works (and is checked) on
        // CPU-only hosts too.
        enable_bf16_autocast().unwrap();
        assert_eq!(cuda_autocast_dtype(), 15);
    }

    #[test]
    fn gpu_names_map_to_their_datasheet_peaks() {
        assert_eq!(peak_bf16_tflops("NVIDIA H100 80GB HBM3"), Some(989.0));
        assert_eq!(peak_bf16_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(peak_bf16_tflops("NVIDIA H200"), Some(989.0));
        assert_eq!(peak_bf16_tflops("NVIDIA A100-SXM4-80GB"), Some(312.0));
        assert_eq!(peak_bf16_tflops("Some Future Card"), None);
    }
}
