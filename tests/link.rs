//! The link guarantee (GPU.md, "the link trap"): Rust links with `--as-needed`,
//! which drops `libtorch_cuda.so` when no code references it, and then libtorch
//! never registers CUDA. sire's C++ shim references it from a static
//! constructor and `build.rs` links the shim whole-archive, so every binary that
//! links sire has `libtorch_cuda.so` as a dependency: mapped from the start,
//! before any sire call. This file holds a single test so that it owns its
//! process: nothing else runs first.

fn mapped_paths() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).map(str::to_string).collect()
}

fn mapped(lib: &str) -> Option<String> {
    mapped_paths()
        .into_iter()
        .find(|p| p.rsplit('/').next().is_some_and(|f| f == lib || f.starts_with(&format!("{lib}."))))
}

#[test]
fn libtorch_cuda_is_linked_into_binaries_that_use_sire() {
    // No sire call yet (and none of tch's): only the dynamic loader ran.
    let cpu = mapped("libtorch_cpu.so").expect("libtorch_cpu.so should be mapped");
    let ships_cuda = std::path::Path::new(&cpu).with_file_name("libtorch_cuda.so").exists();
    if ships_cuda {
        assert!(
            mapped("libtorch_cuda.so").is_some(),
            "libtorch_cuda.so is not mapped at start: the linker dropped it (the shim's link anchor did not hold)"
        );
    } else {
        // A CPU-only libtorch: nothing to link, and no CUDA.
        assert!(!tch::Cuda::is_available());
    }
    // So libtorch registered its CUDA backend at start-up: with a GPU, CUDA is
    // available before sire is set up.
    if cfg!(feature = "cuda-tests") {
        assert!(tch::Cuda::is_available(), "libtorch_cuda.so is linked, but CUDA is not available");
    }
    // The shim and tch agree.
    match sire::device_memory(0) {
        Ok(m) => assert!(tch::Cuda::is_available() && m.total > 0, "{m:?}"),
        Err(sire::Error::NoCuda { .. }) => assert!(!tch::Cuda::is_available()),
        Err(e) => panic!("device_memory(0): {e}"),
    }
    let pools = sire::setup_default_pools().expect("setup");
    // Calling it again is harmless and returns the same pools.
    let again = sire::setup_default_pools().expect("second setup");
    assert_eq!(pools.pools(), again.pools());
}
