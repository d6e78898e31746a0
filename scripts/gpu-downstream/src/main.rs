//! A downstream binary with no build script of its own: does libtorch see CUDA?
//!
//! Prints whether `libtorch_cuda.so` is mapped, `tch::Cuda::is_available()`
//! before and after `sire::setup_default_pools()`, and the device count; with a
//! device, adds two tensors on `cuda:0`. Exits 1 when CUDA is not available or
//! the set-up fails. Needs libtorch on the loader's path (`LD_LIBRARY_PATH`
//! pointing at `torch/lib`): the binary has no rpath.

use tch::{Device, Kind, Tensor};

/// The path of the first mapped file named `lib` (or `lib.*`), from /proc/self/maps.
fn mapped(lib: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find_map(|p| {
        let file = p.rsplit('/').next()?;
        (file == lib || file.starts_with(&format!("{lib}."))).then(|| p.to_string())
    })
}

fn main() {
    let show = |lib: &str| mapped(lib).unwrap_or_else(|| "not mapped".into());
    println!("downstream: libtorch_cpu.so: {}", show("libtorch_cpu.so"));
    println!("downstream: libtorch_cuda.so: {}", show("libtorch_cuda.so"));
    let before = tch::Cuda::is_available();
    let setup = sire::setup_default_pools();
    match &setup {
        Ok(pools) => println!("downstream: sire set up: {pools}"),
        Err(e) => println!("downstream: sire::setup_default_pools() failed: {e}"),
    }
    let available = tch::Cuda::is_available();
    let devices = tch::Cuda::device_count();
    println!("downstream: cuda available: {available} (before set-up: {before}), devices: {devices}");
    if !available {
        eprintln!("downstream: FAIL: libtorch does not see CUDA in a binary without a build script");
        std::process::exit(1);
    }
    let x = Tensor::ones([1024], (Kind::Float, Device::Cuda(0)));
    let sum = (&x + &x).sum(Kind::Float).double_value(&[]);
    println!("downstream: sum of 2 x ones(1024) on cuda:0 = {sum}");
    if setup.is_err() || sum != 2048.0 {
        std::process::exit(1);
    }
}
