//! Lazy registration (issue 12): a model from a safetensors file is registered
//! from its header alone; nothing is read until a guard needs it, and
//! registration never takes host memory beyond the budget.

mod common;

use common::*;
use sire::{Location, TensorSet};
use tch::{Device, Kind, Tensor};

/// Resident set size of this process, bytes, after giving the C allocator's
/// free memory back (`malloc_trim`): the temporaries of the test's own
/// checks (a sum in f64 allocates a copy of the tensor, often in a thread's
/// arena) are not the runtime's memory, and sire trims the allocator only
/// when it frees memory of its own (not when it unmaps weights mapped from
/// their file), so without this they could count for up to a model's size.
fn rss() -> u64 {
    // SAFETY: malloc_trim has no preconditions; it only returns free pages.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// Writes a file of `mib` MiB of f32 (four tensors) whose values derive from `seed`.
fn write(dir: &std::path::Path, name: &str, mib: i64, seed: f64) -> std::path::PathBuf {
    let path = dir.join(name);
    let n = mib * (1 << 20) / 4 / 4;
    let ts: Vec<(String, Tensor)> = (0..4)
        .map(|i| (format!("t{i}"), Tensor::arange(n, (Kind::Float, Device::Cpu)) * (seed + i as f64)))
        .collect();
    Tensor::write_safetensors(&ts, &path).unwrap();
    path
}

/// Taken by every test here: the resident-memory figures must not see the
/// other tests' allocations.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn registration_reads_no_weight_bytes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.safetensors", 64, 1.0);
    let (pools, _d) = pools(256 * MIB);
    let before = rss();
    let m = pools.manage(TensorSet::from_safetensors(&path).unwrap()).unwrap();
    let grown = rss().saturating_sub(before);
    assert_eq!(m.size_bytes(), 64 * MIB, "the size comes from the header");
    assert_eq!(m.location(), Location::Disk, "registered on the disk tier: its file");
    let s = pools.stats();
    assert_eq!(s.bytes_from_disk, 0, "no weight byte read at registration\n{s}");
    assert_eq!(s.pool(Location::Cpu).unwrap().used, 0, "no host memory charged\n{s}");
    assert_eq!(s.pool(Location::Disk).unwrap().used, 0, "the source file costs the disk pool nothing");
    assert!(grown < 16 * MIB, "registration grew the resident set by {} MiB", grown >> 20);
    // The first guard reads it, with the right values.
    let g = sire::auto_manage(&m).unwrap();
    let want = Tensor::arange(64 * (1 << 20) / 16, (Kind::Float, Device::Cpu)) * 3.0;
    assert!(g.get("t2").unwrap().equal(&want));
    assert_eq!(pools.stats().bytes_from_disk, 64 * MIB);
    drop(g);
    // Clean: offloading drops the host copy and writes nothing.
    m.offload().unwrap();
    assert_eq!(pools.stats().bytes_to_disk, 0);
    check_invariants(&pools.stats());
}

/// Four 32 MiB files under an 80 MiB host budget: registering them reads
/// nothing and leaves the resident set where it was (within 16 MiB of slack),
/// and over a round-robin of guards the host pool never passes its budget nor
/// the resident set the budget plus 16 MiB of headroom (one reader window and
/// the allocator's slack), sampled with each guard alive and after it drops.
#[test]
fn the_budget_holds_from_registration_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> =
        (0..4).map(|i| write(dir.path(), &format!("m{i}.safetensors"), 32, i as f64)).collect();
    let (pools, _d) = pools(80 * MIB);
    let base = rss();
    let models: Vec<_> =
        files.iter().map(|f| pools.manage(TensorSet::from_safetensors(f).unwrap()).unwrap()).collect();
    let registered = rss().saturating_sub(base);
    assert_eq!(pools.stats().bytes_from_disk, 0);
    assert!(
        registered < 16 * MIB,
        "registering 128 MiB of models grew the resident set by {} MiB",
        registered >> 20
    );
    let mut peak = 0;
    for round in 0..3 {
        for (i, m) in models.iter().enumerate() {
            let g = sire::auto_manage(m).unwrap();
            let want = (0..(8 << 20) / 4).map(|k| k as f64 * (i + 1) as f64).sum::<f64>();
            let got = g.get("t1").unwrap().sum(Kind::Double).double_value(&[]);
            assert_eq!(got, want, "round {round}, model {i}");
            peak = peak.max(rss().saturating_sub(base));
            drop(g);
            peak = peak.max(rss().saturating_sub(base));
            let st = pools.stats();
            assert!(st.pool(Location::Cpu).unwrap().used <= 80 * MIB, "{st}");
            check_invariants(&st);
        }
    }
    assert!(peak <= 96 * MIB, "the resident set grew by {} MiB (budget 80 MiB + 16 MiB)", peak >> 20);
}

#[test]
fn an_unmanaged_set_reads_itself_on_first_access() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "u.safetensors", 1, 2.0);
    let set = TensorSet::from_safetensors(&path).unwrap();
    assert_eq!(set.names().collect::<Vec<_>>(), ["t0", "t1", "t2", "t3"]);
    let t = set.get("t0").unwrap(); // read now
    assert_eq!(t.size(), [(1 << 20) / 16]);
    assert_eq!(t.double_value(&[1]), 2.0);
    // A file that went away before the first read: `load` says so.
    let gone = write(dir.path(), "gone.safetensors", 1, 1.0);
    let set = TensorSet::from_safetensors(&gone).unwrap();
    std::fs::remove_file(&gone).unwrap();
    let err = set.load().unwrap_err();
    assert!(err.to_string().contains("gone.safetensors"), "{err}");
}
