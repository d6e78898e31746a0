//! GPU tests: run with `--features cuda-tests` on a machine with CUDA. They fail,
//! never skip, when CUDA is not there.
#![cfg(feature = "cuda-tests")]

mod common;

use common::*;
use sire::{Error, Location, ManageOptions, ResourcePoolManagement};
use tch::{Device, Kind, Tensor};

fn gpu_pools(cuda_budget: u64) -> ResourcePoolManagement {
    let p = ResourcePoolManagement::builder()
        .env(false)
        .cuda_budget(cuda_budget)
        .cpu_budget(8 << 30)
        .build()
        .unwrap();
    assert!(tch::Cuda::is_available(), "cuda-tests asked for, but libtorch sees no CUDA device");
    assert!(p.pools().iter().any(|(l, _)| *l == Location::Cuda(0)), "no cuda:0 pool: {p}");
    p
}

#[test]
fn cuda_is_seen_before_and_after_setup() {
    // libtorch_cuda.so is linked through sire's shim: CUDA is registered at start.
    assert!(tch::Cuda::is_available(), "CUDA not available before setup_default_pools()");
    sire::setup_default_pools().unwrap();
    assert!(tch::Cuda::is_available(), "CUDA not available after setup_default_pools()");
    assert!(tch::Cuda::device_count() >= 1);
}

#[test]
fn a_model_moves_to_the_gpu_and_back() {
    let p = gpu_pools(1 << 30);
    let set = model(1, 16 * MIB);
    let reference = snapshot(&set);
    let m = p.manage(set).unwrap();
    assert_eq!(m.runtime(), Location::Cuda(0));
    {
        let g = sire::auto_manage(&m).unwrap();
        assert_eq!(g.device(), Device::Cuda(0));
        assert_eq!(g.get("a").unwrap().device(), Device::Cuda(0));
        let y = g.get("a").unwrap() * 2;
        assert_eq!(y.device(), Device::Cuda(0));
    }
    m.offload().unwrap();
    assert_eq!(m.location(), Location::Cpu);
    let got = snapshot(m.get_unguarded());
    assert_eq!(got, reference, "weights changed by a round trip to the GPU");
    let s = p.stats();
    assert_eq!(s.bytes_host_to_device, 16 * MIB);
    assert_eq!(s.bytes_device_to_host, 0, "a clean offload copies nothing back");
}

#[test]
fn two_models_evict_each_other_under_a_small_cuda_budget() {
    let p = gpu_pools(24 * MIB);
    let a = p.manage_with(model(1, 16 * MIB), ManageOptions::new().name("a")).unwrap();
    let b = p.manage_with(model(2, 16 * MIB), ManageOptions::new().name("b")).unwrap();
    for i in 0..6 {
        let (m, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let g = sire::auto_manage(m).unwrap();
        assert_eq!(g.get("a").unwrap().device(), Device::Cuda(0));
        assert_eq!(other.location(), Location::Cpu);
        check_invariants(&p.stats());
    }
    assert_eq!(p.stats().evictions, 5);
}

#[test]
fn mixed_devices_are_rejected() {
    let p = gpu_pools(1 << 30);
    let set = sire::TensorSet::new([
        ("on_cpu", Tensor::ones([4], (Kind::Float, Device::Cpu))),
        ("on_gpu", Tensor::ones([4], (Kind::Float, Device::Cuda(0)))),
    ])
    .unwrap();
    match p.manage(set) {
        Err(Error::MixedDevices { devices, .. }) => assert!(devices.contains("on_gpu"), "{devices}"),
        other => panic!("expected MixedDevices, got {other:?}"),
    }
}

// ---- The C++ shim's public calls (device memory, caching allocator) ----

#[test]
fn device_memory_is_sane() {
    assert!(tch::Cuda::is_available(), "cuda-tests asked for, but libtorch sees no CUDA device");
    for d in 0..tch::Cuda::device_count() as usize {
        let m = sire::device_memory(d).unwrap();
        assert!(m.total >= 1 << 30, "cuda:{d}: {m:?}");
        assert!(m.free > 0 && m.free <= m.total, "cuda:{d}: {m:?}");
        assert!(m.allocated <= m.reserved && m.reserved <= m.total, "cuda:{d}: {m:?}");
    }
}

/// Environment variable that turns [`allocator_probe`] on in a child process.
const ALLOCATOR_PROBE: &str = "SIRE_CUDA_ALLOCATOR_PROBE";

/// Runs [`allocator_probe`] alone in a new process of this test binary: the
/// caching allocator's counters are per process, and the other tests here
/// allocate on the GPU at the same time.
#[test]
fn allocator_counts_follow_tensors_and_empty_cache_releases() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "allocator_probe", "--test-threads=1", "--nocapture"])
        .env(ALLOCATOR_PROBE, "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("probe ok"), "{text}");
    assert!(text.contains("1 passed"), "{text}");
    println!("{text}");
}

/// A no-op unless [`ALLOCATOR_PROBE`] is set (then it runs alone in its process).
#[test]
fn allocator_probe() {
    if std::env::var_os(ALLOCATOR_PROBE).is_none() {
        return;
    }
    const N: u64 = 256 * MIB;
    let before = sire::device_memory(0).unwrap();
    let t = Tensor::zeros([(N / 4) as i64], (Kind::Float, Device::Cuda(0)));
    let with = sire::device_memory(0).unwrap();
    assert!(with.allocated >= before.allocated + N, "allocated did not grow by {N}: {before:?} -> {with:?}");
    assert!(with.reserved >= before.reserved + N, "reserved did not grow by {N}: {before:?} -> {with:?}");
    drop(t);
    let after = sire::device_memory(0).unwrap();
    assert!(after.allocated + N <= with.allocated, "allocated did not fall by {N}: {with:?} -> {after:?}");
    assert_eq!(after.reserved, with.reserved, "the freed block stays cached until empty_cache");
    sire::empty_cache().unwrap();
    let emptied = sire::device_memory(0).unwrap();
    assert!(
        emptied.reserved + N <= after.reserved,
        "empty_cache did not release {N}: {after:?} -> {emptied:?}"
    );
    assert_eq!(emptied.allocated, after.allocated);
    println!(
        "probe ok: before {before:?}, with {with:?}, after drop {after:?}, after empty_cache {emptied:?}"
    );
}
