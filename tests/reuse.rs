//! Reused host memory (issue 12): the host buffer an evicted model leaves is
//! kept (charged to the host pool) and the load that made room reads into it,
//! with no fresh pages to fault in; a buffer something else still references
//! is never reused, and a cached buffer that fits no load is given back
//! before any model is evicted.

mod common;

use common::*;
use sire::{Location, Managed, ResourcePoolManagement, TensorSet};
use tch::{Device, Kind, Tensor};

/// A model of `bytes` bytes of f32 in two tensors whose values derive from
/// `seed` (no random generator: tests run in parallel).
fn model(seed: i64, bytes: u64) -> TensorSet {
    let n = (bytes / 4) as i64;
    let t = |k: i64, len: i64| Tensor::arange(len, (Kind::Float, Device::Cpu)) * (seed * 2 + k) as f64;
    TensorSet::new([("a", t(1, n / 2)), ("b", t(2, n - n / 2))]).unwrap()
}

/// CPU pools without file mapping (so loads copy into host buffers).
fn copying_pools(budget: u64) -> (ResourcePoolManagement, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(budget)
        .spill_dir(dir.path())
        .map_files(false)
        .build()
        .unwrap();
    (pools, dir)
}

/// Takes a guard on `m`, checks its weights against `want`, and returns the
/// address of its first weight.
fn use_once(m: &Managed<TensorSet>, want: &TensorSet) -> i64 {
    let g = sire::auto_manage(m).unwrap();
    for name in ["a", "b"] {
        assert!(g.get(name).unwrap().equal(&want.get(name).unwrap()), "{name}");
    }
    g.get("a").unwrap().data_ptr() as i64
}

#[test]
fn a_load_reads_into_the_buffer_its_victim_left() {
    let (pools, _d) = copying_pools(20 * MIB);
    let originals: Vec<TensorSet> = (0..3).map(|i| model(i, 8 * MIB)).collect();
    let models: Vec<_> = (0..3).map(|i| pools.manage(model(i, 8 * MIB)).unwrap()).collect();
    // Two rounds: every model is spilled and loaded back into a host buffer.
    let mut at = [0i64; 3];
    for _ in 0..2 {
        for i in 0..3 {
            at[i] = use_once(&models[i], &originals[i]);
            check_invariants(&pools.stats());
        }
    }
    // Round robin under a budget for two: each load evicts the model used two
    // steps before, and reads into the buffer that model left.
    for _ in 0..2 {
        for i in 0..3 {
            let victim = (i + 1) % 3;
            let now = use_once(&models[i], &originals[i]);
            assert_eq!(now, at[victim], "model {i} did not reuse model {victim}'s buffer");
            at[i] = now;
            let s = pools.stats();
            assert_eq!(s.pool(Location::Cpu).unwrap().cached, 0, "the buffer was taken, not kept\n{s}");
            check_invariants(&s);
        }
    }
    let s = pools.stats();
    assert_eq!(s.bytes_mapped, 0);
    assert!(s.evictions >= 10, "{s}");
}

#[test]
fn a_buffer_still_referenced_is_not_reused() {
    let (pools, _d) = copying_pools(20 * MIB);
    let originals: Vec<TensorSet> = (0..3).map(|i| model(10 + i, 8 * MIB)).collect();
    let models: Vec<_> = (0..3).map(|i| pools.manage(model(10 + i, 8 * MIB)).unwrap()).collect();
    for _ in 0..2 {
        for i in 0..3 {
            use_once(&models[i], &originals[i]);
        }
    }
    // Model 1 is the next victim; keep a view of its weight past its eviction.
    let kept = sire::auto_manage(&models[1]).unwrap().get("a").unwrap().view([-1]);
    let kept_at = kept.data_ptr() as i64;
    // Model 1 was used last now: load 0 (evicts 2), then 2 (evicts 1).
    use_once(&models[0], &originals[0]);
    let at = use_once(&models[2], &originals[2]);
    assert_ne!(at, kept_at, "a buffer the user still sees was overwritten");
    assert!(kept.equal(&originals[1].get("a").unwrap().view([-1])), "the user's view changed");
    check_invariants(&pools.stats());
}

#[test]
fn a_cached_buffer_that_fits_no_load_is_given_back_before_any_eviction() {
    let (pools, _d) = copying_pools(30 * MIB);
    let other = pools.manage(model(30, 10 * MIB)).unwrap();
    other.offload().unwrap();
    let big: Vec<_> = (0..3).map(|i| pools.manage(model(20 + i, 8 * MIB)).unwrap()).collect();
    let originals: Vec<TensorSet> = (0..3).map(|i| model(20 + i, 8 * MIB)).collect();
    for _ in 0..2 {
        for i in 0..3 {
            use_once(&big[i], &originals[i]);
        }
    }
    // 24 of 30 MiB used. A 10 MiB model needs one eviction; the victim's
    // 8 MiB buffer fits no 10 MiB load, so it is given back and no second
    // model is evicted for it.
    assert_eq!(pools.stats().pool(Location::Cpu).unwrap().used, 24 * MIB);
    let before = pools.stats().evictions;
    use_once(&other, &model(30, 10 * MIB));
    let s = pools.stats();
    assert_eq!(s.evictions - before, 1, "one eviction made the room\n{s}");
    assert_eq!(s.pool(Location::Cpu).unwrap().cached, 0, "{s}");
    assert_eq!(s.pool(Location::Cpu).unwrap().residents.len(), 3, "{s}");
    check_invariants(&s);
}
