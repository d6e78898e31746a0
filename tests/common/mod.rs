//! Helpers shared by the integration tests.
#![allow(dead_code)]

use sire::{Commit, Location, ResourcePoolManagement, Stats, TensorSet};
use tch::{Kind, Tensor};

pub const MIB: u64 = 1 << 20;

/// An independent CPU + disk instance (no CUDA, no environment) with a private spill dir.
pub fn pools(cpu_budget: u64) -> (ResourcePoolManagement, tempfile::TempDir) {
    pools_with(cpu_budget, 1 << 40)
}

pub fn pools_with(cpu_budget: u64, disk_budget: u64) -> (ResourcePoolManagement, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(cpu_budget)
        .disk_budget(disk_budget)
        .spill_dir(dir.path())
        .wait_timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("build pools");
    (p, dir)
}

/// A model of exactly `bytes` bytes (f32), filled with values derived from `seed`.
pub fn model(seed: i64, bytes: u64) -> TensorSet {
    let n = (bytes / 4) as i64;
    let a = n / 2;
    tch::manual_seed(seed);
    TensorSet::new([
        ("a", Tensor::randn([a], (Kind::Float, tch::Device::Cpu))),
        ("b", Tensor::randn([n - a], (Kind::Float, tch::Device::Cpu))),
    ])
    .expect("tensor set")
}

/// Raw bytes of a CPU tensor (contiguous copy).
pub fn bytes_of(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut v = vec![0u8; n];
    t.copy_data_u8(&mut v, t.numel());
    v
}

/// Every tensor of a set, as raw bytes, by name.
pub fn snapshot(set: &TensorSet) -> Vec<(String, Vec<u8>)> {
    set.names().map(|n| (n.to_string(), bytes_of(&set.get(n).unwrap()))).collect()
}

/// `used <= budget` and `used == sum of residents` for every pool.
pub fn check_invariants(s: &Stats) {
    for p in &s.pools {
        let sum: u64 = p.residents.iter().map(|r| r.bytes).sum();
        assert!(p.used <= p.budget, "{}: used {} > budget {}\n{s}", p.location, p.used, p.budget);
        assert_eq!(p.used, sum + p.cached, "{}: used != sum of residents + cached buffers\n{s}", p.location);
    }
}

/// Names of the models present in a pool, most recently used first.
pub fn residents(s: &Stats, loc: Location) -> Vec<String> {
    s.pool(loc).map(|p| p.residents.iter().map(|r| r.name.clone()).collect()).unwrap_or_default()
}

/// A weight change, and the test's own computation of it (the oracle the
/// commit tests compare `sire` against: plain tch, independent of `commit.rs`).
#[derive(Debug)]
pub enum Op {
    Lora(Tensor, Tensor, f64),
    Delta(Tensor),
    Replace(Tensor),
}

impl Op {
    pub fn commit(&self, target: &str) -> Commit {
        match self {
            Op::Lora(a, b, s) => Commit::lora(target, a.shallow_clone(), b.shallow_clone(), *s),
            Op::Delta(d) => Commit::delta(target, d.shallow_clone()),
            Op::Replace(r) => Commit::replace(target, r.shallow_clone()),
        }
    }

    /// `W ← round(f32(W) + Δ)`, `Δ = (scale·B)·A` (f64 for f64 weights).
    pub fn apply(&self, w: &Tensor) -> Tensor {
        let kind = w.kind();
        let acc = if kind == Kind::Double { Kind::Double } else { Kind::Float };
        match self {
            Op::Lora(a, b, s) => {
                let d = (b.to_kind(acc) * *s).mm(&a.to_kind(acc));
                (w.to_kind(acc) + d.reshape(w.size())).to_kind(kind)
            }
            Op::Delta(d) => (w.to_kind(acc) + d.to_kind(acc)).to_kind(kind),
            Op::Replace(r) => r.to_kind(kind).copy(),
        }
    }
}
