//! Mapped weights (issue 12): a CPU model loaded from a file points into a
//! private mapping of it instead of a copy; bit-identical, charged to the
//! budget, dropped (not written) when the clean model is evicted, and a write
//! makes the model dirty and written back once.

mod common;

use common::*;
use sire::{Location, ResourcePoolManagement, TensorSet};
use tch::{Device, Kind, Tensor};

/// Writes a safetensors file of three f32 tensors (`mib` MiB in all) whose
/// values derive from `seed`; returns its path and the tensors.
fn write(
    dir: &std::path::Path,
    name: &str,
    mib: i64,
    seed: f64,
) -> (std::path::PathBuf, Vec<(String, Tensor)>) {
    let path = dir.join(name);
    let n = mib * (1 << 20) / 4 / 4;
    let ts: Vec<(String, Tensor)> = vec![
        ("w0".into(), Tensor::arange(2 * n, (Kind::Float, Device::Cpu)) * seed),
        ("w1".into(), Tensor::arange(n, (Kind::Float, Device::Cpu)) * (seed + 1.0)),
        ("w2".into(), Tensor::arange(n, (Kind::Float, Device::Cpu)).view([-1, 64]) * (seed + 2.0)),
    ];
    Tensor::write_safetensors(&ts, &path).unwrap();
    (path, ts)
}

/// How many mappings of `path` this process has (`/proc/self/maps`).
fn mappings_of(path: &std::path::Path) -> usize {
    let path = std::fs::canonicalize(path).unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().filter(|l| l.ends_with(path.to_str().unwrap())).count()
}

/// The private spill files of `pools` (there is one folder per instance).
fn spill_files(pools: &ResourcePoolManagement) -> Vec<std::path::PathBuf> {
    let dir = pools.spill_dir().unwrap();
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect()
}

#[test]
fn a_clean_cpu_model_is_mapped_not_copied_and_its_eviction_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, want) = write(dir.path(), "m.safetensors", 8, 3.0);
    let (pools, _d) = pools(64 * MIB);
    let m = pools.manage(TensorSet::from_safetensors(&path).unwrap()).unwrap();
    {
        let g = sire::auto_manage(&m).unwrap();
        for (name, t) in &want {
            assert!(g.get(name).unwrap().equal(t), "{name}");
        }
        assert_eq!(mappings_of(&path), 1, "the weights point into the file");
        let s = pools.stats();
        assert_eq!((s.bytes_from_disk, s.bytes_mapped), (8 * MIB, 8 * MIB), "{s}");
        assert_eq!(s.pool(Location::Cpu).unwrap().used, 8 * MIB, "charged as resident bytes\n{s}");
    }
    m.offload().unwrap();
    assert_eq!(mappings_of(&path), 0, "offloading a clean mapped model drops the mapping");
    let s = pools.stats();
    assert_eq!(s.bytes_to_disk, 0, "nothing written\n{s}");
    assert!(spill_files(&pools).is_empty());
    // Mapped again, same bytes.
    let g = sire::auto_manage(&m).unwrap();
    assert!(g.get("w2").unwrap().equal(&want[2].1));
    assert_eq!(pools.stats().bytes_mapped, 16 * MIB);
    check_invariants(&pools.stats());
}

#[test]
fn a_write_to_mapped_weights_makes_the_model_dirty_and_is_written_back_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, want) = write(dir.path(), "m.safetensors", 4, 1.0);
    let file_before = std::fs::read(&path).unwrap();
    let (pools, _d) = pools(64 * MIB);
    let m = pools.manage(TensorSet::from_safetensors(&path).unwrap()).unwrap();
    {
        let g = sire::auto_manage(&m).unwrap();
        let _ = g.get("w1").unwrap().narrow(0, 0, 4).fill_(-5.0);
    }
    assert_eq!(std::fs::read(&path).unwrap(), file_before, "the source file is never written");
    m.offload().unwrap();
    assert_eq!(mappings_of(&path), 0);
    let s = pools.stats();
    assert_eq!(s.bytes_to_disk, 4 * MIB, "the dirty model is written to its spill file once\n{s}");
    let spilled = spill_files(&pools);
    assert_eq!(spilled.len(), 1);
    {
        // Reloaded by mapping the spill file: the write is there.
        let g = sire::auto_manage(&m).unwrap();
        let w1 = g.get("w1").unwrap();
        assert_eq!(w1.double_value(&[3]), -5.0);
        assert!(w1.narrow(0, 4, w1.size()[0] - 4).equal(&want[1].1.narrow(0, 4, w1.size()[0] - 4)));
        assert_eq!(mappings_of(&spilled[0]), 1, "the spill file is mapped");
        assert_eq!(pools.stats().bytes_mapped, 8 * MIB);
    }
    // Clean again: a second offload writes nothing more.
    m.offload().unwrap();
    assert_eq!(pools.stats().bytes_to_disk, 4 * MIB);
    check_invariants(&pools.stats());
}

#[test]
fn a_tensor_kept_past_eviction_stays_valid() {
    let dir = tempfile::tempdir().unwrap();
    let (path, want) = write(dir.path(), "m.safetensors", 4, 2.0);
    let (pools, _d) = pools(64 * MIB);
    let m = pools.manage(TensorSet::from_safetensors(&path).unwrap()).unwrap();
    // A view: its own tensor over the weight's storage (a shallow clone
    // would be the model's tensor itself, emptied by the eviction).
    let kept = sire::auto_manage(&m).unwrap().get("w0").unwrap().view([-1]);
    m.offload().unwrap();
    // The model let go of its weights; the user's view keeps their mapping.
    assert_eq!(mappings_of(&path), 1);
    assert!(kept.equal(&want[0].1));
    drop(kept);
    assert_eq!(mappings_of(&path), 0);
}

#[test]
fn with_mapping_off_every_load_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (path, want) = write(dir.path(), "m.safetensors", 4, 4.0);
    let spill = tempfile::tempdir().unwrap();
    let pools = ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(64 * MIB)
        .spill_dir(spill.path())
        .map_files(false)
        .build()
        .unwrap();
    let m = pools.manage(TensorSet::from_safetensors(&path).unwrap()).unwrap();
    let g = sire::auto_manage(&m).unwrap();
    assert!(g.get("w1").unwrap().equal(&want[1].1));
    assert_eq!(mappings_of(&path), 0);
    let s = pools.stats();
    assert_eq!((s.bytes_from_disk, s.bytes_mapped), (4 * MIB, 0), "{s}");
}
