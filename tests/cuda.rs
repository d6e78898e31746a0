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
fn cuda_is_seen_after_setup_in_a_binary_without_the_link_fix() {
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
