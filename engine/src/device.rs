//! Which device runs the model: `cpu`, `cuda` or `cuda:N`.
//!
//! One parser for every command line and config file that picks a backend
//! (`--device` on `tandem generate`, `tandem bench engine` and the workers).
//! A build without the `cuda` cargo feature still parses `cuda`, and loading
//! then fails with [`DeviceError::CudaNotBuilt`], which says how to build it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The device an engine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Device {
    /// The CPU kernels on a thread pool.
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

/// Errors from naming or opening a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: expected cpu, cuda or cuda:N (N a GPU ordinal, e.g. cuda:1)")]
    Parse(String),
    #[error(
        "this build has no CUDA support; rebuild with `cargo build --release --features cuda` \
         (the tandem, tandem-prefill-worker and tandem-decode-worker packages forward it)"
    )]
    CudaNotBuilt,
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
}

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n < 1024)
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Parse(s.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for Device {
    type Error = DeviceError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Device> for String {
    fn from(d: Device) -> Self {
        d.to_string()
    }
}

/// Whether this build carries the CUDA backend.
pub fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_spelling() {
        assert_eq!("cpu".parse::<Device>().expect("parses"), Device::Cpu);
        assert_eq!("CPU".parse::<Device>().expect("parses"), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().expect("parses"), Device::Cuda(0));
        assert_eq!("gpu".parse::<Device>().expect("parses"), Device::Cuda(0));
        assert_eq!("cuda:0".parse::<Device>().expect("parses"), Device::Cuda(0));
        assert_eq!(
            " cuda:3 ".parse::<Device>().expect("parses"),
            Device::Cuda(3)
        );
    }

    #[test]
    fn rejects_anything_else_with_the_accepted_forms() {
        for bad in [
            "",
            "cuda:",
            "cuda:-1",
            "cuda:x",
            "cuda:1:2",
            "cuda0",
            "tpu",
            "cuda:+1",
            "cuda:99999",
        ] {
            let e = bad.parse::<Device>().unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, DeviceError::Parse(_)), "{bad:?}");
            assert!(msg.contains("cpu, cuda or cuda:N"), "{msg}");
        }
    }

    #[test]
    fn display_round_trips_and_serde_uses_the_string() {
        for d in [Device::Cpu, Device::Cuda(0), Device::Cuda(7)] {
            assert_eq!(d.to_string().parse::<Device>().expect("parses"), d);
            let j = serde_json::to_string(&d).expect("serializes");
            assert_eq!(serde_json::from_str::<Device>(&j).expect("deserializes"), d);
        }
        assert_eq!(
            serde_json::to_string(&Device::Cuda(2)).expect("serializes"),
            "\"cuda:2\""
        );
        assert!(serde_json::from_str::<Device>("\"cuda:z\"").is_err());
    }

    #[test]
    fn cuda_not_built_says_how_to_build() {
        let msg = DeviceError::CudaNotBuilt.to_string();
        assert!(msg.contains("--features cuda"), "{msg}");
    }
}
