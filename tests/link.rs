//! The library-side CUDA link guarantee (GPU.md, "the link trap").
//!
//! Test binaries are built *without* the crate's link fix (see `build.rs`), like a
//! downstream user's binary: `--as-needed` drops `libtorch_cuda.so`. After
//! `setup_default_pools()` the library must have loaded it. This file holds a
//! single test so that it owns its process: nothing else can load the library first.

fn mapped(lib: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps").lines().any(|l| l.contains(lib))
}

#[test]
fn libtorch_cuda_is_mapped_after_setup() {
    // Touch libtorch so that libtorch_cpu.so is mapped, as in any tch program.
    let _ = tch::Tensor::zeros([1], tch::kind::FLOAT_CPU);
    assert!(mapped("libtorch_cpu.so"), "libtorch_cpu.so should be mapped");
    assert!(
        !mapped("libtorch_cuda.so"),
        "libtorch_cuda.so is mapped before set-up: the test binary was linked with the fix, so this test proves nothing"
    );
    let pools = sire::setup_default_pools().expect("setup");
    assert!(mapped("libtorch_cuda.so"), "setup_default_pools() did not load libtorch_cuda.so");
    // Calling it again is harmless and returns the same pools.
    let again = sire::setup_default_pools().expect("second setup");
    assert_eq!(pools.pools(), again.pools());
}
