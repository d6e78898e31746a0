//! TorchScript modules whose state is not all in parameters: batch-norm running
//! statistics, a registered buffer in a submodule and an integer buffer of
//! positions (fixture `tests/data/ts_buffers.pt`, written by PyTorch with
//! `tests/data/make_ts_buffers.py`, with one input and PyTorch's output for it).
//! The buffers are counted, moved and spilled like the parameters, keeping
//! identity, and the module computes PyTorch's outputs after disk round trips.

mod common;

use common::*;
use sire::{Location, ResourceUser};
use tch::{CModule, Device, Kind, Tensor};

fn data(name: &str) -> std::path::PathBuf {
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name);
    if built.exists() {
        built
    } else {
        std::path::Path::new("tests/data").join(name)
    }
}

/// Taken by every test here: the resident-memory test must not see the
/// others' allocations.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixture() -> (CModule, Tensor, Tensor) {
    let m = CModule::load(data("ts_buffers.pt")).expect("tests/data/ts_buffers.pt");
    let io = Tensor::read_safetensors(data("ts_buffers_io.safetensors")).expect("io fixture");
    let get = |n: &str| io.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    (m, get("x"), get("y"))
}

fn bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

#[test]
fn buffers_are_listed_counted_and_follow_the_module() {
    let _serial = serial();
    let (m, x, y) = fixture();
    let names: Vec<String> = m.tensors().into_iter().map(|(n, _)| n).collect();
    for b in ["position_ids", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "bank.rows"] {
        assert!(names.iter().any(|n| n == b), "buffer {b} missing from {names:?}");
    }
    let params: u64 = m.named_parameters().unwrap().iter().map(|(_, t)| bytes(t)).sum();
    let all: u64 = m.tensors().iter().map(|(_, t)| bytes(t)).sum();
    assert!(all > params, "buffers counted: {all} B in all, {params} B of parameters");
    // The listed tensors are the module's own: changing one changes the output.
    let (pools, _d) = pools(64 * MIB);
    let managed = pools.manage(m).unwrap();
    assert_eq!(managed.size_bytes(), all, "size = parameters + buffers");
    {
        let g = sire::auto_manage(&managed).unwrap();
        let out = g.forward_ts(&[&x]).unwrap();
        assert!(out.allclose(&y, 1e-6, 1e-6, false), "PyTorch's output before any move");
    }
    let rows = managed.get_unguarded().tensors().into_iter().find(|(n, _)| n == "bank.rows").unwrap().1;
    let _ = rows.shallow_clone().fill_(0.0);
    let g = sire::auto_manage(&managed).unwrap();
    let changed = g.forward_ts(&[&x]).unwrap();
    assert!(!changed.allclose(&y, 1e-6, 1e-6, false), "the buffer handle is the module's own buffer");
}

#[test]
fn buffers_survive_disk_round_trips_with_pytorchs_outputs() {
    let _serial = serial();
    let (m, x, y) = fixture();
    let (pools, _d) = pools(64 * MIB);
    let managed = pools.manage(m).unwrap();
    for round in 0..5 {
        managed.offload().unwrap();
        assert_eq!(managed.location(), Location::Disk);
        let g = sire::auto_manage(&managed).unwrap();
        let out = g.forward_ts(&[&x]).unwrap();
        assert_eq!(out.kind(), Kind::Float);
        assert!(out.allclose(&y, 1e-6, 1e-6, false), "round {round}: output differs from PyTorch's");
        let stats = g.tensors().into_iter().find(|(n, _)| n == "bn.num_batches_tracked").unwrap().1;
        assert_eq!(stats.int64_value(&[]), 5, "an integer buffer comes back too");
    }
    check_invariants(&pools.stats());
}

/// While the model is spilled its buffers are on disk: the disk pool holds the
/// whole model, the host pool none of it, and the process's resident memory
/// drops by the buffers' bytes (a 32 MiB buffer here, so that it shows).
#[test]
fn a_spilled_modules_buffers_are_on_disk() {
    let _serial = serial();
    let (m, x, y) = fixture();
    // Enlarge `bank.rows` to 32 MiB; the forward reads only its first rows, so
    // PyTorch's output still holds.
    let rows = m.tensors().into_iter().find(|(n, _)| n == "bank.rows").unwrap().1;
    let big = Tensor::randn([32 << 20 >> 5, 8], (Kind::Float, Device::Cpu));
    big.narrow(0, 0, rows.size()[0]).copy_(&rows);
    let mut handle = rows.shallow_clone();
    handle.set_data(&big);
    drop(big);
    let (pools, _d) = pools(256 * MIB);
    let managed = pools.manage(m).unwrap();
    let size = managed.size_bytes();
    assert!(size >= 32 * MIB);
    let rss = || {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
    };
    let before = rss();
    managed.offload().unwrap();
    let after = rss();
    let s = pools.stats();
    assert_eq!(s.pool(Location::Disk).unwrap().used, size, "the disk pool holds the whole model\n{s}");
    assert_eq!(s.pool(Location::Cpu).unwrap().used, 0, "the host pool none of it\n{s}");
    assert!(
        before.saturating_sub(after) >= 30 * MIB,
        "resident memory dropped by {} MiB only",
        before.saturating_sub(after) >> 20
    );
    let now = managed.get_unguarded().tensors().into_iter().find(|(n, _)| n == "bank.rows").unwrap().1;
    assert_eq!(now.numel(), 0, "the buffer's memory is released while spilled");
    let g = sire::auto_manage(&managed).unwrap();
    assert!(g.forward_ts(&[&x]).unwrap().allclose(&y, 1e-6, 1e-6, false));
    let back = g.tensors().into_iter().find(|(n, _)| n == "bank.rows").unwrap().1;
    assert_eq!(back.size(), [32 << 20 >> 5, 8]);
}

#[cfg(feature = "cuda-tests")]
#[test]
fn a_traced_batch_norm_model_runs_on_the_gpu_like_on_the_cpu() {
    assert!(tch::Cuda::is_available(), "cuda-tests asked for, but libtorch sees no CUDA device");
    let (m, x, y) = fixture();
    let pools = sire::ResourcePoolManagement::builder().env(false).cuda_budget(1 << 30).build().unwrap();
    let managed = pools.manage(m).unwrap();
    {
        let g = sire::auto_manage(&managed).unwrap();
        assert_eq!(g.device(), Device::Cuda(0));
        for (n, t) in g.tensors() {
            assert_eq!(t.device(), Device::Cuda(0), "{n} left behind on {:?}", t.device());
        }
        let out = g.forward_ts(&[x.to_device(g.device())]).unwrap().to_device(Device::Cpu);
        assert!(out.allclose(&y, 1e-5, 1e-5, false), "through auto_manage");
    }
    let hooked = sire::hook(managed).output_device(Device::Cpu);
    let out = hooked.forward_ts(&[&x]).unwrap();
    assert!(out.allclose(&y, 1e-5, 1e-5, false), "through hook");
}
