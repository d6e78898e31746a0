//! The files the runtime writes, in a hostile environment: the spill folder
//! and its files are private, every file read back is the one written for
//! that model (anything planted, copied or forged is refused with a typed
//! error), nothing is followed or waited on, a relative spill directory
//! survives `chdir`, the folder of a killed process is reclaimed by the next
//! set-up, a source file that changed is never reloaded, and a full disk says
//! what is missing.
//!
//! Some tests re-run this test binary as a child process (`helper_process`,
//! selected by the `SIRE_FILES_HELPER` environment variable). Two need root
//! (to give a folder to another user, to mount a small tmpfs); without it
//! they say so on stderr and check nothing.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{model, snapshot, MIB};
use sire::{auto_manage, Error, Location, ManageOptions, ResourcePoolManagement, TensorSet};
use tch::{Kind, Tensor};

/// An instance (CPU + disk, no environment) spilling under `root`.
fn pools_at(root: &Path) -> ResourcePoolManagement {
    ResourcePoolManagement::builder()
        .cuda(false)
        .env(false)
        .cpu_budget(64 * MIB)
        .disk_budget(1 << 40)
        .spill_dir(root)
        .wait_timeout(Duration::from_secs(30))
        .build()
        .expect("build pools")
}

fn named(name: &str) -> ManageOptions {
    ManageOptions::new().name(name)
}

/// The permission bits of `path` itself (not following a symlink).
fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// This process's user id (the owner of a file it just made).
fn my_uid() -> u32 {
    let probe = tempfile::tempfile().unwrap();
    probe.metadata().unwrap().uid()
}

fn is_root() -> bool {
    my_uid() == 0
}

/// The spill files (`*.safetensors`) in the instance's folder.
fn spill_files(p: &ResourcePoolManagement) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(p.spill_dir().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

/// The spill file written by the one offload between `before` and now.
fn new_spill_file(p: &ResourcePoolManagement, before: &[PathBuf]) -> PathBuf {
    let now = spill_files(p);
    let new: Vec<_> = now.iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(new.len(), 1, "one new spill file: {now:?}");
    new[0].clone()
}

/// The path of a `Corrupt` error, failing the test on anything else.
fn corrupt_path<T>(result: sire::Result<T>) -> (PathBuf, String) {
    match result {
        Err(Error::Corrupt { path, detail }) => (path, detail),
        Err(e) => panic!("expected Error::Corrupt, got {e:?}"),
        Ok(_) => panic!("expected Error::Corrupt, got Ok"),
    }
}

/// A safetensors file with sire's format keys and correct checksums for
/// `tensors`, plus `extra` metadata: what a forger who cannot read the
/// genuine file can produce.
fn forge(path: &Path, tensors: &[(&str, &Tensor)], extra: &[(&str, String)]) {
    let mut meta: HashMap<String, String> = extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    meta.insert("sire.format".into(), "1".into());
    let raw: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), common::bytes_of(t), t.size().iter().map(|&d| d as usize).collect()))
        .collect();
    for (n, bytes, _) in &raw {
        meta.insert(format!("sire.xxh3.{n}"), format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes)));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(n, bytes, shape)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    fs::write(path, bytes).unwrap();
}

#[test]
fn the_folder_is_0700_and_the_files_0600() {
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path());
    let dir = p.spill_dir().unwrap().to_owned();
    assert!(dir.is_absolute());
    assert_eq!(dir.parent().unwrap(), root.path());
    let name = dir.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("sire-") && name.len() == 5 + 32, "unguessable name: {name}");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(fs::metadata(&dir).unwrap().uid(), my_uid());

    let m = p.manage_with(model(1, MIB), named("m")).unwrap();
    m.offload().unwrap();
    let files = spill_files(&p);
    assert_eq!(files.len(), 1);
    assert_eq!(mode(&files[0]), 0o600);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left: {:?}", fs::read_dir(&dir));

    // Two instances under one root never share a folder.
    let q = pools_at(root.path());
    assert_ne!(q.spill_dir(), p.spill_dir());
    drop(m);
    drop(p);
    assert!(!dir.exists(), "removed with its instance");
}

#[test]
fn a_world_writable_root_of_another_user_is_not_trusted() {
    if !is_root() {
        eprintln!(
            "a_world_writable_root_of_another_user_is_not_trusted: needs root (chown); nothing checked"
        );
        return;
    }
    const NOBODY: u32 = 65534;
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("sire");
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&root, Some(NOBODY), Some(NOBODY)).unwrap();
    // The other user's own folder, named like ours: neither used nor removed.
    let theirs = root.join(format!("sire-{}", "f".repeat(32)));
    fs::create_dir(&theirs).unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();

    let p = pools_at(&root);
    let dir = p.spill_dir().unwrap().to_owned();
    assert_ne!(dir, theirs);
    assert_eq!(fs::symlink_metadata(&dir).unwrap().uid(), my_uid());
    assert_eq!(mode(&dir), 0o700);
    assert!(theirs.exists(), "another user's folder is left alone");

    let m = p.manage_with(model(2, MIB), named("m")).unwrap();
    m.offload().unwrap();
    let file = spill_files(&p).pop().unwrap();
    assert_eq!(mode(&file), 0o600);

    // A forged file with recomputed checksums and a guessed identity.
    let (a, b) = (
        Tensor::zeros([MIB as i64 / 8], (Kind::Float, tch::Device::Cpu)),
        Tensor::ones([MIB as i64 / 8], (Kind::Float, tch::Device::Cpu)),
    );
    let instance = dir.file_name().unwrap().to_str().unwrap().to_owned();
    let id = file.file_stem().unwrap().to_str().unwrap().to_owned();
    forge(
        &file,
        &[("a", &a), ("b", &b)],
        &[("sire.instance", instance), ("sire.model", id), ("sire.nonce", "0".repeat(32))],
    );
    let (path, detail) = corrupt_path(auto_manage(&m));
    assert_eq!(path, file);
    assert!(detail.contains("nonce"), "{detail}");
    assert_eq!(m.location(), Location::Disk, "the model stays where it was");
}

#[test]
fn a_symlink_planted_at_the_temporary_path_is_not_followed() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("precious");
    fs::write(&target, b"keep me").unwrap();
    let p = pools_at(root.path());
    let dir = p.spill_dir().unwrap().to_owned();
    let m = p.manage_with(model(3, MIB), named("m")).unwrap();
    let want = snapshot(m.get_unguarded());
    // The model's id is not public: plant a link at every likely name.
    for id in 0..16 {
        std::os::unix::fs::symlink(&target, dir.join(format!("{id}.safetensors.tmp"))).unwrap();
    }
    m.offload().unwrap();
    assert!(fs::read(&target).unwrap() == b"keep me", "the link's target was overwritten");
    assert_eq!(m.location(), Location::Disk);
    let g = auto_manage(&m).unwrap();
    assert_eq!(snapshot(&g), want);
}

#[test]
fn a_fifo_planted_at_the_temporary_path_does_not_hang_offload() {
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path());
    let dir = p.spill_dir().unwrap().to_owned();
    for id in 0..16 {
        let fifo = dir.join(format!("{id}.safetensors.tmp"));
        assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    }
    let m = p.manage_with(model(4, MIB), named("m")).unwrap();
    let want = snapshot(m.get_unguarded());
    let (tx, rx) = mpsc::channel();
    let handle = m.clone();
    std::thread::spawn(move || tx.send(handle.offload().map_err(|e| e.to_string())));
    let offloaded = rx.recv_timeout(Duration::from_secs(30)).expect("offload() hung on a FIFO");
    offloaded.unwrap();
    assert_eq!(m.location(), Location::Disk);
    let g = auto_manage(&m).unwrap();
    assert_eq!(snapshot(&g), want);
}

#[test]
fn another_models_spill_file_copied_over_is_corrupt() {
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path());
    let a = p.manage_with(model(5, MIB), named("a")).unwrap();
    let b = p.manage_with(model(6, MIB), named("b")).unwrap();
    let (wa, wb) = (snapshot(a.get_unguarded()), snapshot(b.get_unguarded()));
    a.offload().unwrap();
    let fa = new_spill_file(&p, &[]);
    b.offload().unwrap();
    let fb = new_spill_file(&p, std::slice::from_ref(&fa));
    let genuine = fs::read(&fa).unwrap();

    fs::copy(&fb, &fa).unwrap();
    let (path, detail) = corrupt_path(auto_manage(&a));
    assert_eq!(path, fa);
    assert!(detail.contains("belongs to model"), "{detail}");
    assert_eq!(a.location(), Location::Disk, "the model stays where it was");
    // b is unaffected; a loads again once its own file is back.
    assert_eq!(snapshot(&auto_manage(&b).unwrap()), wb);
    fs::write(&fa, genuine).unwrap();
    assert_eq!(snapshot(&auto_manage(&a).unwrap()), wa);
}

#[test]
fn another_instances_file_is_corrupt() {
    // Two instances (two processes, or two PID namespaces, alike) under one
    // root: the same model id, never each other's weights.
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path());
    let q = pools_at(root.path());
    let a = p.manage_with(model(7, MIB), named("a")).unwrap();
    let b = q.manage_with(model(8, MIB), named("a")).unwrap();
    a.offload().unwrap();
    b.offload().unwrap();
    let (fa, fb) = (spill_files(&p).pop().unwrap(), spill_files(&q).pop().unwrap());
    assert_eq!(fa.file_name(), fb.file_name(), "same model id in both instances");
    fs::copy(&fb, &fa).unwrap();
    let (path, detail) = corrupt_path(auto_manage(&a));
    assert_eq!(path, fa);
    assert!(detail.contains("another sire instance"), "{detail}");
}

#[test]
fn a_forged_file_with_recomputed_checksums_is_corrupt() {
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path());
    let m = p.manage_with(model(9, MIB), named("m")).unwrap();
    m.offload().unwrap();
    let file = spill_files(&p).pop().unwrap();
    let n = MIB as i64 / 8;
    let (a, b) = (
        Tensor::full([n], 7.0, (Kind::Float, tch::Device::Cpu)),
        Tensor::full([n], 8.0, (Kind::Float, tch::Device::Cpu)),
    );
    // Sire's format and valid checksums, no identity.
    forge(&file, &[("a", &a), ("b", &b)], &[]);
    let (path, detail) = corrupt_path(auto_manage(&m));
    assert_eq!(path, file);
    assert!(detail.contains("names no owner"), "{detail}");
    assert_eq!(m.location(), Location::Disk);
}

#[test]
fn a_spill_file_that_disappeared_is_an_error_naming_model_and_file() {
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path());
    let m = p.manage_with(model(10, MIB), named("lost")).unwrap();
    m.offload().unwrap();
    let file = spill_files(&p).pop().unwrap();
    fs::remove_file(&file).unwrap();
    match auto_manage(&m) {
        Err(Error::File { model, path, source }) => {
            assert_eq!((model.as_str(), path.as_path()), ("lost", file.as_path()));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Error::File, got {:?}", other.map(|_| ())),
    };
}

#[test]
fn a_source_file_overwritten_after_registration_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("weights.safetensors");
    let w = Tensor::randn([MIB as i64 / 4], (Kind::Float, tch::Device::Cpu));
    Tensor::write_safetensors(&[("w", &w)], &src).unwrap();
    let root = tempfile::tempdir().unwrap();
    let p = pools_at(root.path());
    let m = p.manage_with(TensorSet::from_safetensors(&src).unwrap(), named("src")).unwrap();
    let copy = p
        .manage_with(TensorSet::from_safetensors(&src).unwrap().private_copy().unwrap(), named("copy"))
        .unwrap();
    m.offload().unwrap();
    copy.offload().unwrap();
    assert_eq!(
        spill_files(&p).len(),
        1,
        "the clean model reloads from its source; the private copy is spilled"
    );
    // Clean reload from the unchanged source.
    assert!(auto_manage(&m).unwrap().get("w").unwrap().equal(&w));
    m.offload().unwrap();

    // Same shape, new values: written over the file.
    let other = Tensor::randn([MIB as i64 / 4], (Kind::Float, tch::Device::Cpu));
    Tensor::write_safetensors(&[("w", &other)], &src).unwrap();
    let (path, detail) = corrupt_path(auto_manage(&m));
    assert_eq!(path, fs::canonicalize(&src).unwrap());
    assert!(detail.contains("changed after the model was loaded"), "{detail}");
    assert_eq!(m.location(), Location::Disk, "the model stays where it was");
    // The private copy does not depend on the file.
    assert!(auto_manage(&copy).unwrap().get("w").unwrap().equal(&w));
}

/// Unmounts a tmpfs when dropped (after what uses it).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_names_the_model_the_file_and_the_room_missing() {
    if !is_root() {
        eprintln!(
            "a_full_disk_names_the_model_the_file_and_the_room_missing: needs root (mount); nothing checked"
        );
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(base.path())
        .status()
        .unwrap();
    assert!(ok.success(), "mount a 1 MiB tmpfs");
    let _mounted = Mounted(base.path().to_owned());
    let p = pools_at(base.path());
    let m = p.manage_with(model(11, 4 * MIB), named("big")).unwrap();
    let want = snapshot(m.get_unguarded());
    match m.offload() {
        Err(Error::File { model, path, source }) => {
            assert_eq!(model, "big");
            assert!(path.starts_with(p.spill_dir().unwrap()), "{path:?}");
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{source}");
            let msg = source.to_string();
            assert!(msg.contains("needs 4.00 MiB") && msg.contains("missing"), "{msg}");
            let err = Error::File { model, path, source };
            eprintln!("{err}");
        }
        other => panic!("expected Error::File (disk full), got {other:?}"),
    }
    assert_eq!(m.location(), Location::Cpu, "the model stays in memory");
    assert_eq!(snapshot(&auto_manage(&m).unwrap()), want);
    assert_eq!(spill_files(&p).len(), 0, "no partial file left");
    drop((m, p));
}

/// The environment variable that makes `helper_process` do something.
const HELPER: &str = "SIRE_FILES_HELPER";

/// Runs this test binary's `helper_process` as a child with `env`.
fn helper(env: &[(&str, &Path)], what: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["helper_process", "--exact", "--nocapture", "--test-threads=1"]).env(HELPER, what);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Not a test of its own: the child-process side of the tests below. Does
/// nothing unless `SIRE_FILES_HELPER` is set.
#[test]
fn helper_process() {
    let Ok(what) = std::env::var(HELPER) else { return };
    match what.as_str() {
        // Set up with a relative spill directory, change directory, then spill
        // and reload.
        "chdir" => {
            let work = PathBuf::from(std::env::var_os("SIRE_FILES_WORK").unwrap());
            let elsewhere = PathBuf::from(std::env::var_os("SIRE_FILES_ELSEWHERE").unwrap());
            std::env::set_current_dir(&work).unwrap();
            let p = pools_at(Path::new("relative/spill"));
            let dir = p.spill_dir().unwrap().to_owned();
            assert!(dir.is_absolute() && dir.starts_with(work.join("relative/spill")), "{dir:?}");
            let m = p.manage_with(model(12, MIB), named("m")).unwrap();
            let want = snapshot(m.get_unguarded());
            std::env::set_current_dir(&elsewhere).unwrap();
            m.offload().unwrap();
            assert_eq!(m.location(), Location::Disk);
            assert!(!elsewhere.join("relative").exists());
            assert_eq!(snapshot(&auto_manage(&m).unwrap()), want);
            println!("HELPER OK");
        }
        // Set up under a root, spill a model, say where, and wait to be killed.
        "linger" => {
            let root = PathBuf::from(std::env::var_os("SIRE_FILES_ROOT").unwrap());
            let p = pools_at(&root);
            let m = p.manage_with(model(13, MIB), named("m")).unwrap();
            m.offload().unwrap();
            println!("DIR {}", p.spill_dir().unwrap().display());
            std::thread::sleep(Duration::from_secs(120));
            unreachable!("killed before");
        }
        other => panic!("unknown helper {other:?}"),
    }
}

#[test]
fn a_relative_spill_dir_survives_chdir() {
    let work = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let out =
        helper(&[("SIRE_FILES_WORK", work.path()), ("SIRE_FILES_ELSEWHERE", elsewhere.path())], "chdir")
            .output()
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("HELPER OK"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_folder_of_a_killed_process_is_reclaimed_by_the_next_set_up() {
    let root = tempfile::tempdir().unwrap();
    let live = pools_at(root.path());
    let mut child =
        helper(&[("SIRE_FILES_ROOT", root.path())], "linger").stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let dead = loop {
        let line = lines.next().expect("the child exited before spilling").unwrap();
        // libtest may print the test's name on the same line first.
        if let Some(at) = line.find("DIR /") {
            break PathBuf::from(&line[at + 4..]);
        }
    };
    assert!(dead.starts_with(root.path()));
    assert_eq!(fs::read_dir(&dead).unwrap().count(), 1, "the child's spill file is there");
    // While the child lives, a set-up leaves its folder alone.
    let other = pools_at(root.path());
    assert!(dead.exists());
    drop(other);

    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    assert!(dead.exists(), "a killed process leaves its folder");
    let next = pools_at(root.path());
    assert!(!dead.exists(), "the next set-up reclaimed it");
    assert!(live.spill_dir().unwrap().exists(), "a live instance's folder is kept");
    assert!(next.spill_dir().unwrap().exists());
}
