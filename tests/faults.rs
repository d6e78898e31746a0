//! Fault injection (issue 16): every fault ends in a typed error or a clean
//! recovery, with the weights intact (their sha256 against a reference built
//! independently of `sire`), the pools' invariants holding, and later
//! operations on the faulty model and on another model succeeding.
//!
//! Faults that cannot be provoked from outside go through the test-only
//! `sire::faults` switch (cargo feature `faults`): a move failing half way as
//! CUDA out of memory would, a full disk where no small tmpfs can be mounted,
//! a failed rename, a process killed between a spill file's write and its
//! rename. Kills happen in child processes: this test binary run again with
//! `SIRE_FAULTS_HELPER` set (`helper_process`).
//!
//! The switch is global to the process, so the tests here run one at a time
//! (`serial`).
//!
//! `cargo test --features faults,registry,pool --test faults`

mod common;
#[path = "common/http.rs"]
mod http;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{check_invariants, model, snapshot, MIB};
use http::{Fault, Server};
use serde_json::json;
use sha2::{Digest, Sha256};
use sire::faults::{self, Action, Point};
use sire::pool::Pool;
use sire::registry::{LoadedModel, Registry};
use sire::{auto_manage, Commit, Error, Location, ManageOptions, Managed, ResourcePoolManagement, TensorSet};
use tch::{Device, Kind, Tensor};

// ---------------------------------------------------------------------------
// Helpers.

/// One test at a time (the fault switch is global); every test starts disarmed.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    faults::disarm();
    guard
}

/// A CPU + disk instance under `root` (no environment), mapping files or not.
fn pools_at(root: &Path, cpu_budget: u64, map_files: bool) -> ResourcePoolManagement {
    ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(cpu_budget)
        .disk_budget(1 << 40)
        .spill_dir(root)
        .map_files(map_files)
        .wait_timeout(Duration::from_secs(30))
        .build()
        .expect("build pools")
}

fn named(name: &str) -> ManageOptions {
    ManageOptions::new().name(name)
}

/// The sha256 of every tensor of a set (names and raw bytes).
fn digest(set: &TensorSet) -> String {
    let mut h = Sha256::new();
    let mut tensors = snapshot(set);
    tensors.sort();
    for (name, bytes) in tensors {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The reference: the same model built again from its seed, never managed.
fn reference(seed: i64, bytes: u64) -> String {
    digest(&model(seed, bytes))
}

/// The weights of `m` under a guard.
fn weights(m: &Managed<TensorSet>) -> String {
    digest(&auto_manage(m).expect("a later guard"))
}

/// Pools consistent: invariants, nothing left moving, no use left on `idle`.
fn consistent(p: &ResourcePoolManagement, idle: &[&Managed<TensorSet>]) {
    let s = p.stats();
    check_invariants(&s);
    assert!(!s.pools.iter().any(|pool| pool.residents.iter().any(|r| r.moving)), "left moving:\n{s}");
    for m in idle {
        assert_eq!(m.use_count(), 0, "`{}` keeps a use", m.name());
    }
}

/// Later operations succeed: `m` loads with `want`, goes to disk and comes
/// back with `want`; `other` loads with `other_want`.
fn later(
    p: &ResourcePoolManagement,
    m: &Managed<TensorSet>,
    want: &str,
    other: &Managed<TensorSet>,
    other_want: &str,
) {
    assert_eq!(weights(m), want, "`{}` after the fault", m.name());
    m.offload().expect("a later offload");
    assert_eq!(m.location(), Location::Disk);
    assert_eq!(weights(m), want, "`{}` after a later round trip through the disk", m.name());
    assert_eq!(weights(other), other_want, "`{}` after the fault", other.name());
    consistent(p, &[m, other]);
}

/// The spill files (`*.safetensors`) and temporary files of an instance.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// The one file that appeared in `dir` since `before`.
fn new_file(dir: &Path, before: &[PathBuf]) -> PathBuf {
    let now = files_in(dir);
    let new: Vec<_> = now.iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(new.len(), 1, "one new file: {now:?}");
    new[0].clone()
}

fn corrupt_path<T>(r: sire::Result<T>) -> PathBuf {
    match r {
        Err(Error::Corrupt { path, .. }) => path,
        Err(e) => panic!("expected Error::Corrupt, got {e:?}"),
        Ok(_) => panic!("expected Error::Corrupt, got Ok"),
    }
}

/// Unmounts a tmpfs when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` on `dir` when this process may (root in most
/// containers); `None` otherwise, or when `SIRE_FAULTS_NO_TMPFS` is set (to
/// test the injected fallback).
fn small_tmpfs(dir: &Path, size: &str) -> Option<Mounted> {
    if std::env::var_os("SIRE_FAULTS_NO_TMPFS").is_some() {
        return None;
    }
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mounted(dir.to_owned()))
}

// ---------------------------------------------------------------------------
// Moves and spill files.

/// A load from disk that fails after the first of the model's two tensors
/// was copied (the libtorch error CUDA out of memory gives), on both read
/// paths (mapping the spill file, and copying it): a typed error, the model
/// still whole on disk, its reservation given back.
#[test]
fn a_move_that_fails_half_way_leaves_the_model_whole_on_disk() {
    let _s = serial();
    for map_files in [true, false] {
        let root = tempfile::tempdir().unwrap();
        let p = pools_at(root.path(), 64 * MIB, map_files);
        let m = p.manage_with(model(1, 2 * MIB), named("m")).unwrap();
        let other = p.manage_with(model(2, MIB), named("other")).unwrap();
        m.offload().unwrap();

        faults::arm(Point::Copy, 1, Action::Fail); // tensor `a` copies, `b` fails
        match auto_manage(&m) {
            Err(Error::Torch(e)) => assert!(e.to_string().contains("out of memory"), "{e}"),
            other => panic!("map_files {map_files}: expected a libtorch error, got {:?}", other.map(|_| ())),
        }
        assert!(!faults::is_armed(Point::Copy), "the fault was reached");
        assert_eq!(m.location(), Location::Disk, "the model stays where it was");
        assert_eq!(common::residents(&p.stats(), Location::Cpu), ["other"], "the reservation was given back");
        consistent(&p, &[&m, &other]);
        later(&p, &m, &reference(1, 2 * MIB), &other, &reference(2, MIB));
    }
}

/// The same fault in a prefetch and in a swap of the exclusive manager: the
/// typed error reaches the caller, the manager's turnstile stays consistent
/// (the next fetches work, one model at a time), the weights are intact.
#[test]
fn a_move_that_fails_half_way_in_a_prefetch_or_a_shared_swap() {
    let _s = serial();
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path(), 64 * MIB, true);
    let m = p.manage_with(model(13, 2 * MIB), named("m")).unwrap();
    m.offload().unwrap();
    faults::arm(Point::Copy, 1, Action::Fail);
    assert!(matches!(sire::prefetch(&m).wait(), Err(Error::Torch(_))));
    assert!(!faults::is_armed(Point::Copy));
    assert_eq!(m.location(), Location::Disk);
    consistent(&p, &[&m]);
    drop(sire::prefetch(&m).wait().expect("a later prefetch"));
    assert_eq!(weights(&m), reference(13, 2 * MIB));

    let shared = sire::SharedModelManager::with_pools(p.clone());
    shared.add_with_id("A", model(14, MIB)).unwrap();
    shared.add_with_id("B", model(15, MIB)).unwrap();
    drop(shared.fetch_model::<TensorSet>("A").unwrap()); // A is the occupant, B on disk
    assert_eq!(shared.model_location("B").unwrap(), Location::Disk);
    faults::arm(Point::Copy, 1, Action::Fail);
    assert!(matches!(shared.fetch_model::<TensorSet>("B"), Err(Error::Torch(_))));
    assert!(!faults::is_armed(Point::Copy));
    assert_eq!(shared.model_location("B").unwrap(), Location::Disk, "B stays where it was");
    check_invariants(&p.stats());
    for (id, seed) in [("B", 15), ("A", 14), ("B", 15)] {
        let g = shared.fetch_model::<TensorSet>(id).unwrap();
        assert_eq!(digest(&g), reference(seed, MIB), "{id}");
        let other = if id == "A" { "B" } else { "A" };
        assert_ne!(shared.model_location(other).unwrap(), Location::Cpu, "one model at a time");
    }
    check_invariants(&p.stats());
}

/// A spill that runs out of disk: on a 1 MiB tmpfs when one can be mounted,
/// else `ENOSPC` injected half way through the file. A typed error naming the
/// model (`StorageFull`), no file left, the model still in memory.
#[test]
fn a_full_disk_fails_the_spill_and_keeps_the_model_in_memory() {
    let _s = serial();
    let base = tempfile::tempdir().unwrap();
    let mounted = small_tmpfs(base.path(), "1m");
    if mounted.is_none() {
        eprintln!("a_full_disk_fails_the_spill: no tmpfs could be mounted; ENOSPC is injected");
    }
    let p = pools_at(base.path(), 64 * MIB, true);
    let dir = p.spill_dir().unwrap().to_owned();
    let big = p.manage_with(model(3, 4 * MIB), named("big")).unwrap();
    let small = p.manage_with(model(4, MIB / 4), named("small")).unwrap();
    if mounted.is_none() {
        faults::arm(Point::SpillWrite, 2, Action::Fail); // header and a first chunk, then full
    }
    match big.offload() {
        Err(Error::File { model, path, source }) => {
            assert_eq!(model, "big");
            assert!(path.starts_with(&dir), "{path:?}");
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{source}");
            assert!(source.to_string().contains("needs 4.00 MiB"), "{source}");
        }
        other => panic!("expected Error::File (disk full), got {other:?}"),
    }
    assert!(!faults::is_armed(Point::SpillWrite));
    assert_eq!(big.location(), Location::Cpu, "the model stays in memory");
    assert_eq!(files_in(&dir), Vec::<PathBuf>::new(), "no partial file left");
    assert_eq!(p.stats().pool(Location::Disk).unwrap().used, 0, "the disk reservation was given back");
    consistent(&p, &[&big, &small]);
    assert_eq!(weights(&big), reference(3, 4 * MIB));
    // The disk still takes a file that fits; the big model works in memory.
    small.offload().expect("a small spill after the failed one");
    assert_eq!(small.location(), Location::Disk);
    assert_eq!(weights(&small), reference(4, MIB / 4));
    assert_eq!(weights(&big), reference(3, 4 * MIB));
    if mounted.is_none() {
        later(&p, &big, &reference(3, 4 * MIB), &small, &reference(4, MIB / 4));
    }
    consistent(&p, &[&big, &small]);
    drop((big, small, p));
}

/// A rename that fails after the temporary file was written (`EIO`), for a
/// first spill and for the rewrite of a model changed since: the model stays
/// in memory with its current weights, the previous file (if any) is kept,
/// no temporary file is left.
#[test]
fn a_failed_rename_keeps_the_model_in_memory_and_the_previous_file() {
    let _s = serial();
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path(), 64 * MIB, true);
    let dir = p.spill_dir().unwrap().to_owned();
    let m = p.manage_with(model(5, MIB), named("m")).unwrap();
    let other = p.manage_with(model(6, MIB), named("other")).unwrap();

    faults::arm(Point::SpillRename, 0, Action::Fail);
    match m.offload() {
        Err(Error::File { model, source, .. }) => {
            assert_eq!(model, "m");
            assert_eq!(source.raw_os_error(), Some(libc::EIO), "{source}");
        }
        other => panic!("expected Error::File, got {other:?}"),
    }
    assert_eq!(m.location(), Location::Cpu);
    assert_eq!(files_in(&dir), Vec::<PathBuf>::new(), "no temporary file left");
    consistent(&p, &[&m, &other]);
    assert_eq!(weights(&m), reference(5, MIB));

    // Spilled once, then changed in memory: the rewrite's rename fails.
    m.offload().unwrap();
    let file = new_file(&dir, &[]);
    let first = std::fs::read(&file).unwrap();
    {
        let g = auto_manage(&m).unwrap();
        let _ = g.get("a").unwrap().fill_(1.5);
    }
    let changed = {
        let set = model(5, MIB);
        let _ = set.get("a").unwrap().fill_(1.5);
        digest(&set)
    };
    faults::arm(Point::SpillRename, 0, Action::Fail);
    assert!(matches!(m.offload(), Err(Error::File { .. })));
    assert_eq!(m.location(), Location::Cpu);
    assert_eq!(files_in(&dir), vec![file.clone()], "the previous file only");
    assert_eq!(std::fs::read(&file).unwrap(), first, "the previous file untouched");
    consistent(&p, &[&m, &other]);
    later(&p, &m, &changed, &other, &reference(6, MIB));
}

/// Spills `a` (2 MiB) and `other` (1 MiB); returns the instance, the models
/// and `a`'s spill file.
fn two_spilled(
    root: &Path,
    map_files: bool,
) -> (ResourcePoolManagement, Managed<TensorSet>, Managed<TensorSet>, PathBuf) {
    let p = pools_at(root, 64 * MIB, map_files);
    let dir = p.spill_dir().unwrap().to_owned();
    let a = p.manage_with(model(7, 2 * MIB), named("a")).unwrap();
    let other = p.manage_with(model(8, MIB), named("other")).unwrap();
    a.offload().unwrap();
    let fa = new_file(&dir, &[]);
    other.offload().unwrap();
    (p, a, other, fa)
}

/// After `a`'s file was spoilt: `Corrupt` naming the file, every time; the
/// model stays on disk, unused; the other model works; once the genuine
/// file is back, `a` loads with its own weights.
fn refused_then_restored(
    p: &ResourcePoolManagement,
    a: &Managed<TensorSet>,
    other: &Managed<TensorSet>,
    fa: &Path,
    genuine: &[u8],
) {
    for _ in 0..2 {
        assert_eq!(corrupt_path(auto_manage(a)), fa);
        assert_eq!(a.location(), Location::Disk, "the model stays where it was");
        consistent(p, &[a, other]);
    }
    assert_eq!(weights(other), reference(8, MIB));
    std::fs::write(fa, genuine).unwrap();
    later(p, a, &reference(7, 2 * MIB), other, &reference(8, MIB));
}

#[test]
fn a_corrupted_spill_file_is_refused() {
    let _s = serial();
    for map_files in [true, false] {
        let root = tempfile::tempdir().unwrap();
        let (p, a, other, fa) = two_spilled(root.path(), map_files);
        let genuine = std::fs::read(&fa).unwrap();
        let mut bad = genuine.clone();
        let at = bad.len() / 2; // inside the data
        bad[at] ^= 0x40;
        std::fs::write(&fa, &bad).unwrap();
        refused_then_restored(&p, &a, &other, &fa, &genuine);
    }
}

#[test]
fn a_truncated_spill_file_is_refused() {
    let _s = serial();
    for map_files in [true, false] {
        let root = tempfile::tempdir().unwrap();
        let (p, a, other, fa) = two_spilled(root.path(), map_files);
        let genuine = std::fs::read(&fa).unwrap();
        std::fs::OpenOptions::new().write(true).open(&fa).unwrap().set_len(genuine.len() as u64 / 2).unwrap();
        refused_then_restored(&p, &a, &other, &fa, &genuine);
    }
}

/// The file substituted by the model's own earlier spill file (a genuine
/// file, right model, right instance, valid checksums, stale weights) and by
/// another model's file.
#[test]
fn a_substituted_spill_file_is_refused() {
    let _s = serial();
    let root = tempfile::tempdir().unwrap();
    let (p, a, other, fa) = two_spilled(root.path(), true);
    let stale = std::fs::read(&fa).unwrap();
    // Changed and spilled again: a new file, with other weights.
    {
        let g = auto_manage(&a).unwrap();
        let _ = g.get("b").unwrap().fill_(-2.0);
    }
    a.offload().unwrap();
    let genuine = std::fs::read(&fa).unwrap();
    assert_ne!(genuine, stale);
    let changed = {
        let set = model(7, 2 * MIB);
        let _ = set.get("b").unwrap().fill_(-2.0);
        digest(&set)
    };
    std::fs::write(&fa, &stale).unwrap();
    assert_eq!(corrupt_path(auto_manage(&a)), fa);
    assert_eq!(a.location(), Location::Disk);
    consistent(&p, &[&a, &other]);
    // Another model's file.
    let fo = files_in(p.spill_dir().unwrap()).into_iter().find(|f| *f != fa).unwrap();
    std::fs::copy(&fo, &fa).unwrap();
    assert_eq!(corrupt_path(auto_manage(&a)), fa);
    consistent(&p, &[&a, &other]);
    assert_eq!(weights(&other), reference(8, MIB));
    std::fs::write(&fa, &genuine).unwrap();
    later(&p, &a, &changed, &other, &reference(8, MIB));
}

/// A spill file overwritten in place, then truncated, while its model is
/// resident and copied in memory (`map_files(false)`): the resident weights
/// are untouched; once the clean model has been offloaded (its spill file is
/// then its only copy), the reload is `Corrupt` and the model stays on disk;
/// the genuine file put back loads. (With `map_files(true)`, the default, a
/// CPU model's tensors point into a private mapping of the file: a truncation
/// faults the process with SIGBUS and an in-place write shows through pages
/// not yet written, as `Builder::map_files` documents; see RELIABILITY.md.)
#[test]
fn a_spill_file_spoilt_under_its_resident_model() {
    let _s = serial();
    let root = tempfile::tempdir().unwrap();
    let (p, a, other, fa) = two_spilled(root.path(), false);
    let genuine = std::fs::read(&fa).unwrap();
    assert_eq!(weights(&a), reference(7, 2 * MIB)); // resident, copied
    let mut bad = genuine.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    std::fs::write(&fa, &bad).unwrap();
    assert_eq!(weights(&a), reference(7, 2 * MIB), "the resident copy is untouched");
    std::fs::OpenOptions::new().write(true).open(&fa).unwrap().set_len(genuine.len() as u64 / 2).unwrap();
    assert_eq!(weights(&a), reference(7, 2 * MIB), "the resident copy is untouched");
    a.offload().unwrap(); // clean: nothing written, the (spoilt) file is its copy
    refused_then_restored(&p, &a, &other, &fa, &genuine);
}

// ---------------------------------------------------------------------------
// Panics.

/// A panic inside a guarded region, borrowed and owned (in a thread that
/// dies of it): both uses given back, so the model can be evicted for
/// another that needs the room.
#[test]
fn a_panic_inside_a_guard_releases_it() {
    let _s = serial();
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path(), 3 * MIB, true); // room for one of the two
    let m = p.manage_with(model(9, 2 * MIB), named("m")).unwrap();
    let other = p.manage_with(model(10, 2 * MIB), named("other")).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let g = auto_manage(&m).unwrap();
        let _ = g.get("a").unwrap().sum(Kind::Double);
        panic!("user code panics while holding a guard");
    }));
    assert!(r.is_err());
    let m2 = m.clone();
    let died = std::thread::spawn(move || {
        let _g = sire::auto_manage_owned(&m2).unwrap();
        panic!("a thread dies holding an owned guard");
    })
    .join();
    assert!(died.is_err());
    consistent(&p, &[&m, &other]);
    // `other` needs `m`'s room: `m` is idle and goes.
    assert_eq!(m.location(), Location::Cpu);
    assert_eq!(weights(&other), reference(10, 2 * MIB));
    assert_eq!(m.location(), Location::Disk, "evicted for the other model");
    later(&p, &m, &reference(9, 2 * MIB), &other, &reference(10, 2 * MIB));
}

fn w(values: &[f32]) -> Tensor {
    Tensor::from_slice(values)
}

/// A model with one weight `w`, its base values, and a counter of closure
/// applications (apply +1, revert -1) that panics once where asked.
struct Patched {
    p: ResourcePoolManagement,
    m: Managed<TensorSet>,
    other: Managed<TensorSet>,
    base: Vec<f32>,
    level: Arc<AtomicI64>,
    _root: tempfile::TempDir,
}

impl Patched {
    fn new() -> Patched {
        let root = tempfile::tempdir().unwrap();
        let p = pools_at(root.path(), 64 * MIB, true);
        let base: Vec<f32> = (0..64).map(|i| i as f32 * 0.37 - 5.0).collect();
        let m = p.manage_with(TensorSet::new([("w", w(&base))]).unwrap(), named("m")).unwrap();
        let other = p.manage_with(model(11, MIB), named("other")).unwrap();
        Patched { p, m, other, base, level: Arc::new(AtomicI64::new(0)), _root: root }
    }

    /// A closure commit; its apply (or revert) panics the first time if asked.
    fn closure(&self, panic_in_apply: bool, panic_in_revert: bool) -> Commit {
        let (up, down) = (self.level.clone(), self.level.clone());
        let (armed_apply, armed_revert) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        Commit::closure(
            "counter",
            move || -> Result<(), std::io::Error> {
                if panic_in_apply && armed_apply.fetch_add(1, SeqCst) == 0 {
                    panic!("user bug in a commit's apply");
                }
                up.fetch_add(1, SeqCst);
                Ok(())
            },
            move || -> Result<(), std::io::Error> {
                if panic_in_revert && armed_revert.fetch_add(1, SeqCst) == 0 {
                    panic!("user bug in a commit's revert");
                }
                down.fetch_sub(1, SeqCst);
                Ok(())
            },
        )
    }

    /// The weight under a guard, as f32 values.
    fn values(&self) -> Vec<f32> {
        let g = auto_manage(&self.m).unwrap();
        Vec::<f32>::try_from(&g.get("w").unwrap()).unwrap()
    }

    /// base + the sum of `deltas`, computed in plain Rust (f32, in order).
    fn expected(&self, deltas: &[&[f32]]) -> Vec<f32> {
        self.base.iter().enumerate().map(|(i, b)| deltas.iter().fold(*b, |acc, d| acc + d[i])).collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn consistent(&self) {
        let s = self.p.stats();
        check_invariants(&s);
        assert_eq!((self.m.use_count(), self.other.use_count()), (0, 0));
    }

    /// Later, with every commit reverted: a round trip through the disk
    /// gives the base, a new commit `d` gives base + `d`, and the other model
    /// is untouched.
    fn round_trip(&self, d: &[f32]) {
        self.m.offload().unwrap();
        assert_eq!(Patched::bits(&self.values()), Patched::bits(&self.base));
        self.m.commit(Commit::delta("w", w(d))).unwrap();
        assert_eq!(Patched::bits(&self.values()), Patched::bits(&self.expected(&[d])));
        assert_eq!(weights(&self.other), reference(11, MIB));
        self.consistent();
    }
}

/// A closure commit whose apply panics (squashed with a weight delta): the
/// panic reaches the caller, the use is given back, the weights are the
/// previous stack's; the next guard applies the whole stack once, and
/// reverting everything gives the base back bit for bit.
#[test]
fn a_panic_inside_a_commits_apply() {
    let _s = serial();
    let t = Patched::new();
    let d1: Vec<f32> = (0..64).map(|i| (i % 7) as f32 * 0.25).collect();
    let d2: Vec<f32> = (0..64).map(|i| (i % 5) as f32 * -0.5).collect();
    t.m.commit(Commit::delta("w", w(&d1))).unwrap();
    assert_eq!(Patched::bits(&t.values()), Patched::bits(&t.expected(&[&d1])));
    t.m.commit(Commit::squash([Commit::delta("w", w(&d2)), t.closure(true, false)])).unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| auto_manage(&t.m).map(|_| ())));
    assert!(r.is_err(), "the closure's panic reaches the caller");
    t.consistent();
    assert_eq!(t.level.load(SeqCst), 0, "the closure never completed");
    // The weights are still the first commit's (through a variant wanting exactly that).
    let v = t.m.variant();
    v.revert();
    {
        let g = auto_manage(&v).unwrap();
        let now = Vec::<f32>::try_from(&g.get("w").unwrap()).unwrap();
        assert_eq!(Patched::bits(&now), Patched::bits(&t.expected(&[&d1])));
    }
    drop(v);
    // The closure no longer panics: the whole stack, once.
    assert_eq!(Patched::bits(&t.values()), Patched::bits(&t.expected(&[&d1, &d2])));
    assert_eq!(t.level.load(SeqCst), 1);
    t.m.revert_all();
    assert_eq!(Patched::bits(&t.values()), Patched::bits(&t.base), "the base, bit for bit");
    assert_eq!(t.level.load(SeqCst), 0);
    t.consistent();
    t.round_trip(&d2);
}

/// A closure commit whose revert panics: the panic reaches the caller, the
/// use is given back; the next guard reverts it (once) and the base comes
/// back bit for bit.
#[test]
fn a_panic_inside_a_commits_revert() {
    let _s = serial();
    let t = Patched::new();
    let d1: Vec<f32> = (0..64).map(|i| (i % 3) as f32 * 0.125).collect();
    t.m.commit(t.closure(false, true)).unwrap();
    t.m.commit(Commit::delta("w", w(&d1))).unwrap();
    assert_eq!(Patched::bits(&t.values()), Patched::bits(&t.expected(&[&d1])));
    assert_eq!(t.level.load(SeqCst), 1);
    t.m.revert_all();
    let r = catch_unwind(AssertUnwindSafe(|| auto_manage(&t.m).map(|_| ())));
    assert!(r.is_err(), "the closure's panic reaches the caller");
    t.consistent();
    assert_eq!(t.level.load(SeqCst), 1, "the closure's revert never completed");
    assert_eq!(Patched::bits(&t.values()), Patched::bits(&t.base), "the base, bit for bit");
    assert_eq!(t.level.load(SeqCst), 0, "reverted once");
    t.consistent();
    t.round_trip(&d1);
}

/// Failed moves of a model that carries commits: a spill that fills the disk
/// (the patches were taken off first), a load that fails half way, and the
/// same for a variant's switch. Each is a typed error; the next guard gets
/// exactly its stack (base + delta, or the base bit for bit).
#[test]
fn a_failed_move_of_a_patched_model_keeps_its_stack() {
    let _s = serial();
    let t = Patched::new();
    let d1: Vec<f32> = (0..64).map(|i| (i % 7) as f32 * 0.25).collect();
    t.m.commit(Commit::delta("w", w(&d1))).unwrap();
    let patched = Patched::bits(&t.expected(&[&d1]));
    assert_eq!(Patched::bits(&t.values()), patched);

    faults::arm(Point::SpillWrite, 0, Action::Fail);
    match t.m.offload() {
        Err(Error::File { source, .. }) => assert_eq!(source.kind(), std::io::ErrorKind::StorageFull),
        other => panic!("expected Error::File, got {other:?}"),
    }
    assert_eq!(t.m.location(), Location::Cpu);
    t.consistent();
    assert_eq!(Patched::bits(&t.values()), patched, "the patches are back on");

    t.m.offload().unwrap();
    faults::arm(Point::Copy, 0, Action::Fail);
    assert!(matches!(auto_manage(&t.m), Err(Error::Torch(_))));
    assert_eq!(t.m.location(), Location::Disk);
    t.consistent();
    assert_eq!(Patched::bits(&t.values()), patched);

    let v = t.m.variant();
    v.revert(); // the base
    t.m.offload().unwrap();
    faults::arm(Point::Copy, 0, Action::Fail);
    assert!(matches!(auto_manage(&v), Err(Error::Torch(_))));
    assert!(!faults::is_armed(Point::Copy));
    t.consistent();
    let base = Vec::<f32>::try_from(&auto_manage(&v).unwrap().get("w").unwrap()).unwrap();
    assert_eq!(Patched::bits(&base), Patched::bits(&t.base), "the variant: the base, bit for bit");
    assert_eq!(Patched::bits(&t.values()), patched, "and back to the commit");
    assert_eq!(weights(&t.other), reference(11, MIB));
    t.consistent();
}

/// A hooked module whose forward panics (an input of the wrong shape): the
/// guard is released, the weights are the module's, later forwards give the
/// plain module's outputs bit for bit.
#[test]
fn a_panic_inside_a_hook() {
    use tch::nn::{Module, VarStore};
    let _s = serial();
    #[derive(Debug)]
    struct Net {
        vs: VarStore,
        lin: Mutex<tch::nn::Linear>,
    }
    impl sire::ResourceUser for Net {
        fn tensors(&self) -> Vec<(String, Tensor)> {
            self.vs.tensors().into_iter().collect()
        }
    }
    impl Module for Net {
        fn forward(&self, xs: &Tensor) -> Tensor {
            self.lin.lock().unwrap_or_else(|e| e.into_inner()).forward(xs)
        }
    }
    fn net(seed: i64) -> Net {
        tch::manual_seed(seed);
        let vs = VarStore::new(Device::Cpu);
        let lin = tch::nn::linear(vs.root() / "l", 64, 32, Default::default());
        Net { vs, lin: Mutex::new(lin) }
    }
    fn bits(t: &Tensor) -> Vec<u8> {
        common::bytes_of(t)
    }
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path(), 64 * MIB, true);
    tch::manual_seed(12);
    let x = Tensor::randn([3, 64], (Kind::Float, Device::Cpu));
    let (want, want_other) = (bits(&net(13).forward(&x)), bits(&net(14).forward(&x)));
    let h = sire::hook(p.manage_with(net(13), named("h")).unwrap());
    let other = sire::hook(p.manage_with(net(14), named("other")).unwrap());
    let wrong = Tensor::zeros([3, 5], (Kind::Float, Device::Cpu));
    assert!(catch_unwind(AssertUnwindSafe(|| h.forward(&wrong))).is_err());
    assert_eq!(h.managed().use_count(), 0);
    check_invariants(&p.stats());
    assert_eq!(bits(&h.forward(&x)), want);
    h.managed().offload().unwrap();
    assert_eq!(h.managed().location(), Location::Disk);
    assert_eq!(bits(&h.forward(&x)), want, "after a round trip through the disk");
    assert_eq!(bits(&other.forward(&x)), want_other);
    assert_eq!((h.managed().use_count(), other.managed().use_count()), (0, 0));
    check_invariants(&p.stats());
}

/// Task-pool models: one per device, managed in one budget with room for
/// one at a time. Returns the pools, the pool, the models and their
/// reference digests.
type PoolModel = (Managed<TensorSet>, String);

/// Tasks that panic while holding a guard on their device's model (the two
/// models share room for one, so a leaked use would stall the other
/// device): each panic is that task's outcome, the others see their model's
/// weights intact, and a later run and a later use succeed.
#[test]
fn a_panic_inside_a_pool_task() {
    let _s = serial();
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path(), 3 * MIB / 2, true);
    let made = Mutex::new(vec![(21, model(21, MIB)), (22, model(22, MIB))]);
    let kept = Mutex::new(Vec::new());
    let pool = Pool::builder()
        .devices([Location::Cpu, Location::Cpu])
        .progress(false)
        .build(|_| -> sire::Result<PoolModel> {
            let (seed, set) = made.lock().unwrap().pop().unwrap();
            let m = p.manage_with(set, named(&format!("m{seed}")))?;
            kept.lock().unwrap().push((m.clone(), seed));
            Ok((m, reference(seed, MIB)))
        })
        .unwrap();
    let run = |panics: bool| {
        pool.execute((0..12).collect::<Vec<u32>>(), |&t, _, (m, want): &PoolModel| {
            let g = auto_manage(m)?;
            if digest(&g) != *want {
                return Err(Error::InvalidOptions {
                    model: m.name().into(),
                    reason: "weights changed".into(),
                });
            }
            if panics && t % 4 == 3 {
                panic!("task {t} panics holding a guard");
            }
            Ok(t)
        })
        .unwrap()
    };
    for o in run(true) {
        match (o.index % 4, &o.result) {
            (3, Err(Error::TaskPanicked { message, .. })) => assert!(message.contains("holding a guard")),
            (3, other) => panic!("task {}: expected TaskPanicked, got {other:?}", o.index),
            (_, r) => assert_eq!(*r.as_ref().unwrap(), o.index as u32),
        }
    }
    let kept = kept.into_inner().unwrap();
    let models: Vec<&Managed<TensorSet>> = kept.iter().map(|(m, _)| m).collect();
    consistent(&p, &models);
    assert!(run(false).iter().all(|o| o.result.is_ok()), "a later run");
    for (m, seed) in &kept {
        assert_eq!(weights(m), reference(*seed, MIB));
    }
    consistent(&p, &models);
    drop((pool, kept));
    let s = p.stats();
    assert_eq!(s.pools.iter().map(|pool| pool.used).sum::<u64>(), 0, "the pool's models are freed:\n{s}");
    let fresh = p.manage_with(model(23, MIB), named("fresh")).unwrap();
    assert_eq!(weights(&fresh), reference(23, MIB));
}

/// An init that panics after registering its device's model: a typed
/// `DeviceInit` failure, the half-made model unregistered (its bytes given
/// back), the other device works, and later models load.
#[test]
fn a_panic_inside_a_pool_init() {
    let _s = serial();
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path(), 64 * MIB, true);
    let made = Mutex::new(vec![(31, model(31, MIB)), (32, model(32, MIB))]);
    let pool = Pool::builder()
        .devices([Location::Cpu, Location::Cpu])
        .progress(false)
        .build(|_| -> sire::Result<PoolModel> {
            let (seed, set) = made.lock().unwrap().pop().unwrap();
            let m = p.manage_with(set, named(&format!("m{seed}")))?;
            if seed == 31 {
                drop(auto_manage(&m)?);
                panic!("init panics after registering its model");
            }
            Ok((m, reference(seed, MIB)))
        })
        .unwrap();
    assert_eq!(pool.devices().len(), 1);
    match pool.init_failures() {
        [Error::DeviceInit { message, .. }] => assert!(message.contains("init panics"), "{message}"),
        other => panic!("expected one DeviceInit, got {other:?}"),
    }
    let s = p.stats();
    check_invariants(&s);
    let names: Vec<&str> =
        s.pools.iter().flat_map(|pool| pool.residents.iter().map(|r| r.name.as_str())).collect();
    assert_eq!(names, ["m32"], "the panicking init's model is unregistered:\n{s}");
    let out = pool
        .execute((0..4).collect::<Vec<u32>>(), |&t, _, (m, want): &PoolModel| {
            Ok::<_, Error>((t, digest(&*auto_manage(m)?) == *want))
        })
        .unwrap();
    assert!(out.iter().all(|o| o.result.as_ref().is_ok_and(|r| r.1)), "{out:?}");
    drop(pool);
    let fresh = p.manage_with(model(33, MIB), named("fresh")).unwrap();
    let other = p.manage_with(model(34, MIB), named("other")).unwrap();
    later(&p, &fresh, &reference(33, MIB), &other, &reference(34, MIB));
}

// ---------------------------------------------------------------------------
// Processes killed.

/// The environment variable that makes `helper_process` do something.
const HELPER: &str = "SIRE_FAULTS_HELPER";

/// This test binary's `helper_process`, as a child doing `what` with `arg`.
fn helper(what: &str, arg: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["helper_process", "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER, what)
        .env("SIRE_FAULTS_ARG", arg)
        .stdout(Stdio::piped());
    cmd
}

/// The first `PREFIX <path>` line a child prints.
fn path_line(child: &mut std::process::Child, prefix: &str) -> PathBuf {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the child exited early").unwrap();
        // libtest may print the test's name on the same line first.
        if let Some(at) = line.find(prefix) {
            return PathBuf::from(&line[at + prefix.len()..]);
        }
    }
}

/// A registry on private caches under `dir`, no environment, fast retries.
fn registry(dir: &Path, catalogue: &Path) -> sire::registry::RegistryBuilder {
    Registry::builder()
        .env(false)
        .cache_dir(dir.join("cache"))
        .hf_cache_dir(dir.join("hf"))
        .progress(false)
        .retries(2)
        .backoff(Duration::from_millis(10))
        .timeout(Duration::from_secs(30))
        .catalogue(catalogue)
}

/// Not a test of its own: the child-process side of the tests below. Does
/// nothing unless `SIRE_FAULTS_HELPER` is set.
#[test]
fn helper_process() {
    let Ok(what) = std::env::var(HELPER) else { return };
    let arg = PathBuf::from(std::env::var_os("SIRE_FAULTS_ARG").unwrap());
    match what.as_str() {
        // Spill a model, change it, and be killed while spilling it again,
        // between the temporary file's write and its rename.
        "kill-at-rename" => {
            let p = pools_at(&arg, 64 * MIB, true);
            println!("DIR {}", p.spill_dir().unwrap().display());
            let m = p.manage_with(model(41, MIB), named("m")).unwrap();
            m.offload().unwrap();
            {
                let g = auto_manage(&m).unwrap();
                let _ = g.get("a").unwrap().fill_(3.25);
            }
            faults::arm(Point::SpillRename, 0, Action::Kill);
            let _ = m.offload();
            unreachable!("killed before the rename");
        }
        // Download the catalogue's model `m` (the parent kills this), or be
        // killed just before the downloaded file's rename.
        "download" | "download-kill-at-rename" => {
            if what == "download-kill-at-rename" {
                faults::arm(Point::DownloadRename, 0, Action::Kill);
            }
            let reg = registry(arg.parent().unwrap(), &arg).build().unwrap();
            let _ = reg.download("m");
            std::thread::sleep(Duration::from_secs(60));
            unreachable!("killed before");
        }
        other => panic!("unknown helper {other:?}"),
    }
}

/// A process killed (`SIGKILL`) after writing a spill file's temporary file
/// and before renaming it, over an earlier genuine file: its folder, with
/// both files, is reclaimed by the next set-up under the same root, never
/// read; a file carried over from it into a new instance is `Corrupt`; the
/// new instance's models spill and load with their weights.
#[test]
fn a_process_killed_between_write_and_rename_leaves_nothing_trusted() {
    let _s = serial();
    let root = tempfile::tempdir().unwrap();
    let mut child = helper("kill-at-rename", root.path()).spawn().unwrap();
    let dead = path_line(&mut child, "DIR ");
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "killed at the rename: {status:?}");
    assert!(dead.starts_with(root.path()));
    let left = files_in(&dead);
    let names: Vec<String> =
        left.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "the earlier file and the temporary one: {names:?}");
    assert!(names[0].ends_with(".safetensors") && names[1] == format!("{}.tmp", names[0]), "{names:?}");
    let (old, tmp) = (std::fs::read(&left[0]).unwrap(), std::fs::read(&left[1]).unwrap());
    assert_eq!(old.len(), tmp.len(), "the temporary file was written whole");
    assert_ne!(old, tmp);

    let p = pools_at(root.path(), 64 * MIB, true);
    assert!(!dead.exists(), "the dead process's folder is reclaimed");
    let dir = p.spill_dir().unwrap().to_owned();
    // The same model id, name and size in the new instance.
    let m = p.manage_with(model(41, MIB), named("m")).unwrap();
    let other = p.manage_with(model(42, MIB), named("other")).unwrap();
    m.offload().unwrap();
    let file = new_file(&dir, &[]);
    assert_eq!(file.file_name().unwrap().to_string_lossy(), names[0], "same model id");
    let genuine = std::fs::read(&file).unwrap();
    for carried in [&old, &tmp] {
        std::fs::write(&file, carried).unwrap();
        assert_eq!(corrupt_path(auto_manage(&m)), file, "a dead instance's file is not trusted");
        assert_eq!(m.location(), Location::Disk);
        consistent(&p, &[&m, &other]);
    }
    std::fs::write(&file, genuine).unwrap();
    later(&p, &m, &reference(41, MIB), &other, &reference(42, MIB));
}

/// The files under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A model served slowly by a local HTTP server, and a catalogue naming it.
struct Served {
    dir: tempfile::TempDir,
    server: Server,
    route: &'static str,
    body: Vec<u8>,
    catalogue: PathBuf,
}

impl Served {
    /// Model 51 (1 MiB) as a safetensors file, sent 32 KiB every 40 ms.
    fn new() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("source.safetensors");
        let set = model(51, MIB);
        let tensors: Vec<(String, Tensor)> =
            set.names().map(|n| (n.to_string(), set.get(n).unwrap())).collect();
        Tensor::write_safetensors(&tensors, &src).unwrap();
        let body = std::fs::read(&src).unwrap();
        let sha: String = Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
        let server = Server::start();
        let route = "/files/m.safetensors";
        server.add(route, body.clone(), Fault::Slow { chunk: 32 << 10, delay: Duration::from_millis(40) });
        let catalogue = dir.path().join("catalogue.json");
        let entry = json!({ "m": {
            "type": "safetensors",
            "config": {
                "files": [{ "path": "m/m.safetensors", "sha256": sha }],
                "download": [{ "file_name": "m.safetensors", "file_path": "m", "file_url": server.url(route) }]
            }
        }});
        std::fs::write(&catalogue, serde_json::to_string_pretty(&entry).unwrap()).unwrap();
        Served { dir, server, route, body, catalogue }
    }

    /// The partial download, once it holds at least `min` bytes.
    fn partial(&self, min: u64) -> Option<PathBuf> {
        walk(&self.dir.path().join("cache"))
            .into_iter()
            .find(|p| p.to_string_lossy().ends_with(".incomplete"))
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() >= min))
    }

    /// A new process's turn: the server mends, the model is loaded by key
    /// into new pools; the file is whole and verified, no partial file is
    /// left, and the model's weights are model 51's. Returns the requests
    /// for the file the server saw.
    fn load_in_a_new_process(&self) -> Vec<http::Seen> {
        self.server.add(self.route, self.body.clone(), Fault::None);
        let root = tempfile::tempdir().unwrap();
        let p = pools_at(root.path(), 64 * MIB, true);
        let reg = registry(self.dir.path(), &self.catalogue).pools(p.clone()).build().unwrap();
        let LoadedModel::Tensors(m) = reg.load("m").unwrap() else { panic!("a safetensors model") };
        assert!(reg.validate("m").unwrap().available);
        assert!(self.partial(0).is_none(), "no partial file left");
        let file = walk(&self.dir.path().join("cache"))
            .into_iter()
            .find(|p| p.ends_with("m/m.safetensors"))
            .unwrap();
        assert_eq!(std::fs::read(file).unwrap(), self.body, "the file is whole");
        let other = p.manage_with(model(52, MIB), named("other")).unwrap();
        later(&p, &m, &reference(51, MIB), &other, &reference(52, MIB));
        self.server.seen().into_iter().filter(|s| s.path == self.route).collect()
    }
}

/// A process killed (`SIGKILL`) in the middle of a download: the next
/// process resumes the partial file where it stopped (its lock went with
/// the process), checks the sha256, and loads the model with its weights.
#[test]
fn a_process_killed_during_a_download_resumes_and_verifies() {
    let _s = serial();
    let served = Served::new();
    let mut child = helper("download", &served.catalogue).spawn().unwrap();
    let t0 = Instant::now();
    while served.partial(256 << 10).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(60), "the child's download never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let cut = std::fs::metadata(served.partial(0).expect("the partial file stays")).unwrap().len();
    assert!(cut < served.body.len() as u64, "killed before the end ({cut} bytes)");
    let gets = served.load_in_a_new_process();
    assert_eq!(
        gets.last().unwrap().range.as_deref(),
        Some(format!("bytes={cut}-").as_str()),
        "resumed where the killed process stopped: {gets:?}"
    );
}

/// A process killed (`SIGKILL`) after its download was written and checked,
/// just before the rename into place: the next process does not trust the
/// unrenamed file (its sidecar is gone), downloads it again, checks it, and
/// loads the model.
#[test]
fn a_process_killed_between_a_downloads_check_and_rename_downloads_again() {
    let _s = serial();
    let served = Served::new();
    served.server.add(served.route, served.body.clone(), Fault::None);
    let out = helper("download-kill-at-rename", &served.catalogue).output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{:?}", out.status);
    let left = served.partial(0).expect("the checked, unrenamed file");
    assert_eq!(std::fs::metadata(left).unwrap().len(), served.body.len() as u64);
    let gets = served.load_in_a_new_process();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].range, None, "downloaded again from the start: {gets:?}");
}
