//! The model: GPT shapes and presets, the network, its flat parameters, AdamW and the LR schedule.
//! Pure tensor code: nothing here does I/O (beyond a one-time warning when one of Tessera's CUDA kernels fails
//! and libtorch's ops take over), talks to actors or knows about ranks.

pub mod config;
pub mod gpt;
pub mod optim;
pub mod params;
pub mod schedule;

pub use config::{preset, preset_names, GptConfig, PRESETS};
pub use gpt::Gpt;
pub use optim::{AdamW, AdamWConfig};
pub use params::{ParamLayout, Params};
pub use schedule::CosineSchedule;
