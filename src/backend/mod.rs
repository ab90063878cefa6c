//! Compute backends. `cpu` is the f32 reference and the CPU fast path; `cuda` runs flexrun's
//! kernels on an NVIDIA GPU. [`Device`] is where a command computes, chosen once (the CLI's
//! `--device auto|cpu|cuda`) and passed down as a value.
pub mod cpu;
pub mod cuda;
pub mod kernels;
pub mod shapes;

use crate::error::Result;

/// What the user asked for: `auto` (the GPU when one can be used, else the CPU), `cpu` or `cuda`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Where a command computes: the CPU (f32, the reference) or one GPU (flexrun's kernels, bf16
/// weights and activations, f32 statistics, master weights and optimizer state).
pub struct Device {
    gpu: Option<cuda::Device>,
    choice: DeviceChoice,
}

impl Device {
    /// Open the device `choice` names. `cuda` without a usable GPU is an error; `auto` falls back
    /// to the CPU, with a one-line note on stderr when a CUDA driver is installed but its GPU
    /// cannot be used (a machine without a driver never had a GPU to fall back from).
    pub fn open(choice: DeviceChoice) -> Result<Device> {
        let gpu = match choice {
            DeviceChoice::Cpu => None,
            DeviceChoice::Cuda => Some(
                cuda::Device::new(0).map_err(|e| crate::Error(format!("--device cuda: {e}")))?,
            ),
            DeviceChoice::Auto => match cuda::Device::new(0) {
                Ok(d) => Some(d),
                Err(e) => {
                    if cuda::libcuda_present() {
                        crate::note!("note: no usable GPU ({e}); running on the CPU");
                    }
                    None
                }
            },
        };
        Ok(Device { gpu, choice })
    }

    /// The CPU.
    pub fn cpu() -> Device {
        Device {
            gpu: None,
            choice: DeviceChoice::Cpu,
        }
    }

    /// The GPU, when computing on one.
    pub fn gpu(&self) -> Option<&cuda::Device> {
        self.gpu.as_ref()
    }

    /// Whether the device was chosen automatically (so a caller may still fall back to the CPU
    /// for a model the GPU kernels cannot run).
    pub fn is_auto(&self) -> bool {
        self.choice == DeviceChoice::Auto
    }

    /// "cpu", or the GPU's name.
    pub fn describe(&self) -> String {
        match &self.gpu {
            None => "cpu".into(),
            Some(d) => d.name().unwrap_or_else(|_| "cuda".into()),
        }
    }
}
