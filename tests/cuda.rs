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

// ---- The transfer engine on a GPU ----

#[test]
fn the_home_copy_is_packed_pinned_and_loads_in_one_copy() {
    let p = gpu_pools(1 << 30);
    let set = model(3, 32 * MIB);
    let reference = snapshot(&set);
    let m = p.manage(set).unwrap();
    assert_eq!(p.stats().pinned, 32 * MIB, "the home is pinned (default cap: half the host budget)");
    let home = m.get_unguarded().get("a").unwrap();
    assert!(home.is_pinned(Device::Cuda(0)), "home tensors live in pinned memory");
    let (pa, pb) = (home.data_ptr() as usize, m.get_unguarded().get("b").unwrap().data_ptr() as usize);
    assert_eq!(pb - pa, 16 * MIB as usize, "one packed buffer: b follows a");
    for _ in 0..3 {
        let g = sire::auto_manage(&m).unwrap();
        let (da, db) = (g.get("a").unwrap(), g.get("b").unwrap());
        assert_eq!(da.device(), Device::Cuda(0));
        assert_eq!(db.data_ptr() as usize - da.data_ptr() as usize, 16 * MIB as usize, "one device buffer");
        drop(g);
        m.offload().unwrap();
        assert_eq!(m.get_unguarded().get("a").unwrap().data_ptr() as usize, pa, "back on the same home");
    }
    assert_eq!(snapshot(m.get_unguarded()), reference);
    let s = p.stats();
    assert_eq!(s.bytes_device_to_host, 0);
    assert_eq!(s.bytes_host_to_device, 3 * 32 * MIB);
}

#[test]
fn beyond_the_pinned_cap_homes_are_pageable_and_still_correct() {
    let p = ResourcePoolManagement::builder()
        .env(false)
        .cuda_budget(1 << 30)
        .cpu_budget(1 << 30)
        .pinned_cap(20 * MIB)
        .build()
        .unwrap();
    let a = p.manage(model(4, 16 * MIB)).unwrap();
    let b = p.manage(model(5, 16 * MIB)).unwrap();
    assert_eq!(p.stats().pinned, 16 * MIB);
    assert!(a.get_unguarded().get("a").unwrap().is_pinned(Device::Cuda(0)));
    assert!(!b.get_unguarded().get("a").unwrap().is_pinned(Device::Cuda(0)));
    let want = snapshot(b.get_unguarded());
    let g = sire::auto_manage(&b).unwrap();
    assert_eq!(snapshot_on_cpu(&g), want);
}

fn snapshot_on_cpu(set: &sire::TensorSet) -> Vec<(String, Vec<u8>)> {
    set.names().map(|n| (n.to_string(), bytes_of(&set.get(n).unwrap().to_device(Device::Cpu)))).collect()
}

#[test]
fn a_written_weight_is_copied_back_into_the_packed_home() {
    let p = gpu_pools(1 << 30);
    let m = p.manage(model(6, 8 * MIB)).unwrap();
    {
        let g = sire::auto_manage(&m).unwrap();
        let _ = g.get("a").unwrap().fill_(7.0);
    }
    m.offload().unwrap();
    let a = m.get_unguarded().get("a").unwrap();
    assert_eq!(a.device(), Device::Cpu);
    assert!(a.is_pinned(Device::Cuda(0)), "still in the packed pinned home");
    assert_eq!(a.min().double_value(&[]), 7.0);
    assert_eq!(p.stats().bytes_device_to_host, 4 * MIB, "only the written tensor came back");
}

#[test]
fn a_batch_and_a_prefetch_load_to_the_gpu() {
    let p = gpu_pools(1 << 30);
    let a = p.manage(model(7, 16 * MIB)).unwrap();
    let b = p.manage(model(8, 16 * MIB)).unwrap();
    let (wa, wb) = (snapshot(a.get_unguarded()), snapshot(b.get_unguarded()));
    let batch = sire::auto_manage_all(&[a.handle(), b.handle()]).unwrap();
    assert_eq!((a.location(), b.location()), (Location::Cuda(0), Location::Cuda(0)));
    drop(batch);
    a.offload().unwrap();
    let x = Tensor::randn([2048, 2048], (Kind::Float, Device::Cuda(0)));
    let pending = sire::prefetch(&a);
    let y = x.matmul(&x); // overlaps the copy (side stream)
    let g = pending.wait().unwrap();
    assert_eq!(snapshot_on_cpu(&g), wa);
    assert!(y.sum(Kind::Float).double_value(&[]).is_finite());
    let gb = sire::auto_manage(&b).unwrap();
    assert_eq!(snapshot_on_cpu(&gb), wb);
}

/// Defect 8: a prefetch that evicts a model written on the GPU copies it back
/// only after the kernels the caller queued on its own stream (here: a long
/// chain of matmuls, then a fill) have run, so the home gets the final values.
#[test]
fn a_prefetch_copies_back_a_written_victim_after_the_callers_kernels() {
    let p = gpu_pools(40 * MIB);
    let a = p.manage_with(model(1, 16 * MIB), ManageOptions::new().name("a")).unwrap();
    let b = p.manage_with(model(2, 32 * MIB), ManageOptions::new().name("b")).unwrap();
    {
        let g = sire::auto_manage(&a).unwrap();
        let w = g.get("a").unwrap();
        // Queue work on this thread's stream without waiting for it.
        let x = Tensor::randn([2048, 2048], (Kind::Float, Device::Cuda(0)));
        let mut y = x.shallow_clone();
        for _ in 0..50 {
            y = y.mm(&x).tanh();
        }
        let _ = w.shallow_clone().fill_(7.0).f_add_(&(y.sum(Kind::Float) * 0.0)).unwrap();
    } // a is idle, dirty, its fill still queued
    let gb = sire::prefetch(&b).wait().unwrap(); // evicts a from the prefetch thread
    assert_eq!(a.location(), Location::Cpu);
    let home = a.get_unguarded().get("a").unwrap();
    assert_eq!(home.device(), Device::Cpu);
    assert_eq!(home.min().double_value(&[]), 7.0, "the copy-back ran before the caller's fill");
    drop(gb);
}

/// A model twice a CUDA budget, in 8 parts, streamed part by part from its
/// host copies (the next part prefetched through `sire::prefetch`, its copy on
/// a side stream): the outputs equal the same layers on the CPU, every pass
/// copies at least the shortfall to the device, the budget holds after every
/// part, and a part released while its kernels may still run is evicted only
/// after them (the output stays right over many passes).
#[test]
fn a_model_twice_the_cuda_budget_streams_in_parts() {
    use sire::{Split, TensorSet};
    const D: i64 = 1024;
    let layer_bytes = (D * D * 4) as u64;
    let p = gpu_pools(4 * layer_bytes);
    tch::manual_seed(21);
    let ws: Vec<(String, Tensor)> = (0..8)
        .map(|i| (format!("l{i}.w"), Tensor::randn([D, D], (Kind::Float, Device::Cpu)) / (D as f64).sqrt()))
        .collect();
    let x = Tensor::randn([D, 32], (Kind::Float, Device::Cpu));
    let want = ws.iter().fold(x.shallow_clone(), |h, (_, w)| w.mm(&h).tanh());
    let set = TensorSet::new(ws.iter().map(|(n, w)| (n.clone(), w.copy()))).unwrap();
    let m = p.manage_parts(set, Split::TopLevel, ManageOptions::new().name("net")).unwrap();
    assert_eq!(m.parts()[0].runtime(), Location::Cuda(0));
    for pass in 0..5 {
        let before = p.stats().bytes_host_to_device;
        let mut s = m.stream();
        let mut h = x.to_device(Device::Cuda(0));
        for i in 0..8 {
            let part = s.part(i).unwrap();
            assert_eq!(part.device(), Device::Cuda(0));
            h = part.get(&format!("l{i}.w")).unwrap().mm(&h).tanh();
            check_invariants(&p.stats());
        }
        drop(s);
        let got = h.to_device(Device::Cpu);
        assert!(got.allclose(&want, 1e-4, 1e-5, false), "pass {pass}: the streamed output differs");
        let copied = p.stats().bytes_host_to_device - before;
        assert!(copied >= 4 * layer_bytes, "pass {pass}: copied {copied} bytes, the shortfall is 4 layers");
    }
}
