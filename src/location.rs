//! Where bytes can live.

use std::fmt;

/// A place that holds model weights; each location has one pool with a budget.
///
/// `Copy + Hash`, so it keys maps and is cheap to pass around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    /// CUDA device with this index.
    Cuda(usize),
    /// Host memory.
    Cpu,
    /// The spill directory on disk.
    Disk,
}

impl Location {
    /// The `tch` device that computes at this location (`None` for [`Location::Disk`]).
    pub fn device(self) -> Option<tch::Device> {
        match self {
            Location::Cuda(i) => Some(tch::Device::Cuda(i)),
            Location::Cpu => Some(tch::Device::Cpu),
            Location::Disk => None,
        }
    }

    /// The location of a `tch` device (`Mps`/`Vulkan` are not managed and map to `None`).
    pub fn from_device(d: tch::Device) -> Option<Location> {
        match d {
            tch::Device::Cuda(i) => Some(Location::Cuda(i)),
            tch::Device::Cpu => Some(Location::Cpu),
            _ => None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Cuda(i) => write!(f, "cuda:{i}"),
            Location::Cpu => f.write_str("cpu"),
            Location::Disk => f.write_str("disk"),
        }
    }
}
