//! The disk tier's unit tests: the format, checksums, identity, private
//! folders, source files, and the reader's memory and speed.

use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;

use super::*;

/// Serializes the tests that measure memory or time.
static HEAVY: Mutex<()> = Mutex::new(());
const MIB: u64 = 1 << 20;

fn cpu(kind: Kind) -> (Kind, Device) {
    (kind, Device::Cpu)
}

fn named(tensors: Vec<(&str, Tensor)>) -> Vec<(String, Tensor)> {
    tensors.into_iter().map(|(n, t)| (n.to_owned(), t)).collect()
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|&n| n.to_owned()).collect()
}

/// A tensor's elements as raw bytes, in row-major order.
fn raw(tensor: &Tensor) -> Vec<u8> {
    let mut bytes = vec![0; byte_len(tensor)];
    tensor.contiguous().copy_data_u8(&mut bytes, tensor.numel());
    bytes
}

/// The detail of a `Corrupt` error, failing the test on anything else.
fn corrupt_detail<T: std::fmt::Debug>(result: Result<T>) -> String {
    match result {
        Err(Error::Corrupt { detail, .. }) => detail,
        other => panic!("expected Error::Corrupt, got {other:?}"),
    }
}

/// Where the data of tensor `name` starts in the file at `path`.
fn data_offset(path: &Path, name: &str) -> usize {
    let bytes = fs::read(path).unwrap();
    let (header_len, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    PREFIX_LEN + header_len + metadata.info(name).unwrap().data_offsets.0
}

fn sample() -> Vec<(String, Tensor)> {
    named(vec![
        ("u8", Tensor::from_slice(&[0u8, 1, 127, 128, 255])),
        ("f32", Tensor::randn([3, 4], cpu(Kind::Float))),
        ("f64", Tensor::randn([5], cpu(Kind::Double))),
        ("f16", Tensor::randn([2, 3], cpu(Kind::Half))),
        ("bf16", Tensor::randn([7], cpu(Kind::BFloat16))),
        ("i8", Tensor::from_slice(&[-128i8, -1, 0, 1, 127])),
        ("i16", Tensor::from_slice(&[i16::MIN, -1, 0, i16::MAX])),
        ("i32", Tensor::from_slice(&[i32::MIN, 0, i32::MAX])),
        ("i64", Tensor::from_slice(&[i64::MIN, 0, i64::MAX]).view([3, 1])),
        ("bool", Tensor::from_slice(&[true, false, true])),
        ("transposed", Tensor::randn([4, 6], cpu(Kind::Float)).tr()),
        ("empty", Tensor::zeros([0, 5], cpu(Kind::Float))),
        ("scalar", Tensor::from(2.5f64)),
    ])
}

#[test]
fn round_trip_preserves_kinds_shapes_and_bits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.spill");
    let tensors = sample();
    assert!(!tensors[10].1.is_contiguous());

    let size = write(&path, &tensors).unwrap();
    assert_eq!(size, fs::metadata(&path).unwrap().len());
    assert!(!dir.path().join("m.spill.tmp").exists());

    // Ask in a different order than written, and twice for one name.
    let mut names: Vec<String> = tensors.iter().rev().map(|(n, _)| n.clone()).collect();
    names.push("f32".into());
    let read = read(&path, &names, true).unwrap();
    assert_eq!(read.len(), names.len());
    for (name, got) in names.iter().zip(&read) {
        let want = &tensors.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(got.kind(), want.kind(), "{name}");
        assert_eq!(got.size(), want.size(), "{name}");
        assert_eq!(got.device(), Device::Cpu, "{name}");
        assert!(got.is_contiguous(), "{name}");
        assert!(got.equal(want), "{name}");
        assert_eq!(raw(got), raw(want), "{name}");
    }
}

#[test]
fn file_is_standard_safetensors_with_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.spill");
    let tensors = sample();
    write(&path, &tensors).unwrap();

    let bytes = fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header_len % 8, 0);
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let extra = metadata.metadata().as_ref().unwrap();
    assert_eq!(extra[FORMAT_KEY], "1");
    assert_eq!(extra.len(), tensors.len() + 1);
    for (name, tensor) in &tensors {
        let view = file.tensor(name).unwrap();
        assert_eq!(view.data(), raw(tensor).as_slice(), "{name}");
        let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
        assert_eq!(start % tensor.kind().elt_size_in_bytes(), 0, "{name} misaligned");
        let sum = &extra[&format!("sire.xxh3.{name}")];
        assert_eq!(sum, &format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&raw(tensor))));
    }
    // libtorch's own reader accepts it too.
    let by_tch = Tensor::read_safetensors(&path).unwrap();
    assert_eq!(by_tch.len(), tensors.len());
}

#[test]
fn corrupted_byte_is_reported_with_the_tensor_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.spill");
    let tensors = named(vec![
        ("a", Tensor::randn([64], cpu(Kind::Float))),
        ("b", Tensor::randn([64], cpu(Kind::Float))),
    ]);
    write(&path, &tensors).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    bytes[data_offset(&path, "b") + 17] ^= 0x40;
    fs::write(&path, &bytes).unwrap();

    let detail = corrupt_detail(read(&path, &strings(&["a", "b"]), false));
    assert!(detail.contains("checksum mismatch for tensor `b`"), "{detail}");
    // Each tensor has its own checksum: `a` is still readable.
    let a = read(&path, &strings(&["a"]), true).unwrap();
    assert!(a[0].equal(&tensors[0].1));
}

#[test]
fn truncated_garbled_or_incomplete_files_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.spill");
    let names = strings(&["x"]);
    write(&path, &named(vec![("x", Tensor::randn([256], cpu(Kind::Float)))])).unwrap();
    let good = fs::read(&path).unwrap();

    let detail = corrupt_detail(read(&path, &strings(&["x", "nope"]), false));
    assert!(detail.contains("no tensor `nope`"), "{detail}");

    fs::write(&path, &good[..good.len() - 1]).unwrap();
    corrupt_detail(read(&path, &names, false));
    fs::write(&path, &good[..good.len() / 2]).unwrap();
    corrupt_detail(read(&path, &names, false));
    fs::write(&path, &good[..5]).unwrap();
    corrupt_detail(read(&path, &names, false));
    fs::write(&path, b"").unwrap();
    corrupt_detail(read(&path, &names, false));

    let mut garbage = 16u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"this is not json");
    fs::write(&path, &garbage).unwrap();
    let detail = corrupt_detail(read(&path, &names, false));
    assert!(detail.contains("bad header"), "{detail}");

    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&good[8..]);
    fs::write(&path, &huge).unwrap();
    corrupt_detail(read(&path, &names, false));

    // A checksum that is not 16 lowercase hex digits (same length, so the
    // header stays well-formed).
    let sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&good[good.len() - 1024..]));
    let at = good.windows(16).position(|w| w == sum.as_bytes()).unwrap();
    let mut bad = good.clone();
    bad[at] = b'g';
    fs::write(&path, &bad).unwrap();
    let detail = corrupt_detail(read(&path, &names, false));
    assert!(detail.contains("malformed checksum"), "{detail}");
}

#[test]
fn missing_file_is_io() {
    let dir = tempfile::tempdir().unwrap();
    let err = read(&dir.path().join("absent"), &strings(&["x"]), false).unwrap_err();
    assert!(matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::NotFound), "{err:?}");
}

#[test]
fn plain_safetensors_files_are_read_without_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.safetensors");
    let x = Tensor::randn([3, 5], cpu(Kind::Float));
    let y = Tensor::from_slice(&[1i64, 2, 3]);
    Tensor::write_safetensors(&[("x", &x), ("y", &y)], &path).unwrap();

    let got = read(&path, &strings(&["y", "x"]), false).unwrap();
    assert!(got[0].equal(&y) && got[1].equal(&x));
    let detail = corrupt_detail(read(&path, &strings(&["x"]), true));
    assert!(detail.contains("no checksum for tensor `x`"), "{detail}");
}

#[test]
fn failed_rename_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    // `path` is a non-empty directory: everything succeeds but the rename.
    let path = dir.path().join("m.spill");
    fs::create_dir(&path).unwrap();
    fs::write(path.join("keep"), b"x").unwrap();
    let err = write(&path, &sample()).unwrap_err();
    assert!(matches!(err, Error::Io(_)), "{err:?}");
    assert!(!dir.path().join("m.spill.tmp").exists());
    assert!(path.join("keep").exists());
}

#[test]
fn unusable_directory_is_io_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("m.spill");
    let err = write(&path, &sample()).unwrap_err();
    assert!(matches!(err, Error::Io(_)), "{err:?}");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn failed_write_keeps_the_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.spill");
    write(&path, &sample()).unwrap();
    let before = fs::read(&path).unwrap();

    let mut bad = sample();
    bad.push(("c".into(), Tensor::randn([4], cpu(Kind::ComplexFloat))));
    let err = write(&path, &bad).unwrap_err();
    assert!(matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::InvalidInput), "{err:?}");
    assert!(err.to_string().contains("`c`"), "{err}");

    let mut twice = sample();
    twice.push(("f32".into(), Tensor::zeros([1], cpu(Kind::Float))));
    assert!(write(&path, &twice).is_err());

    assert_eq!(fs::read(&path).unwrap(), before);
    assert!(!dir.path().join("m.spill.tmp").exists());
    assert!(read(&path, &strings(&["f32"]), true).is_ok());
}

/// The process's resident set, in bytes.
fn resident() -> u64 {
    let statm = fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * page_size() as u64
}

/// Resets the process's peak resident set to the current one; false where
/// the kernel does not allow it.
fn reset_peak_resident() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident set (`VmHWM`), in bytes.
fn peak_resident() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Set in the child process that [`run_alone`] starts.
const ALONE: &str = "SIRE_TEST_ALONE";

/// Runs the test `name` (its full path) alone in a new process of this test
/// binary, so no other test's allocations or frees blur the resident-set
/// figures it measures; fails unless it ran there and passed.
fn run_alone(name: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE, "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "`{name}` failed in its own process");
    assert!(text.contains("1 passed"), "`{name}` did not run in its own process");
}

#[test]
fn read_holds_one_copy_of_the_data() {
    if std::env::var_os(ALONE).is_none() {
        return run_alone("tier::spill::tests::read_holds_one_copy_of_the_data");
    }
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    const SIZE: u64 = 64 * MIB;
    let big = || Tensor::arange((SIZE / 4) as i64, cpu(Kind::Int));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.spill");
    let tensors = named(vec![("big", big()), ("small", Tensor::ones([3], cpu(Kind::Float)))]);
    write(&path, &tensors).unwrap();
    drop(tensors);
    let names = strings(&["small", "big"]);
    // Warm up the page cache, the allocator and libtorch.
    drop(read(&path, &names, true).unwrap());

    let before = resident();
    let peak_known = reset_peak_resident();
    let tensors = read(&path, &names, true).unwrap();
    let after = resident();
    // The peak catches file pages held during the read; after it they
    // are unmapped anyway.
    let peak = if peak_known { peak_resident() } else { after };
    let (held, grew) = (after.saturating_sub(before), peak.saturating_sub(before));
    eprintln!("resident: +{} MiB held, +{} MiB at peak", held / MIB, grew / MIB);
    assert!(held > SIZE / 2, "the result is not resident (+{held} bytes): bad measurement");
    assert!(held < SIZE * 5 / 4, "holding the result grew the resident set by {held} bytes");
    assert!(grew < SIZE * 5 / 4, "reading grew the resident set by up to {grew} bytes");
    assert!(tensors[1].equal(&big()));
}

/// Prints how fast `read` is next to `std::fs::read` of the same cached
/// file: `cargo test --release --lib spill -- --ignored --nocapture`.
#[test]
#[ignore = "timing, informational"]
fn read_throughput_vs_fs_read() {
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    const SIZE: u64 = 256 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("big.spill");
    let plain = dir.path().join("big.safetensors");
    let tensors = named(vec![
        ("a", Tensor::randn([(SIZE / 8) as i64], cpu(Kind::Float))),
        ("b", Tensor::randn([(SIZE / 16) as i64], cpu(Kind::Half))),
        ("c", Tensor::randn([(SIZE / 32) as i64, 4], cpu(Kind::BFloat16))),
    ]);
    write(&spill, &tensors).unwrap();
    Tensor::write_safetensors(&tensors, &plain).unwrap();
    drop(tensors);
    let names = strings(&["a", "b", "c"]);
    let best = |f: &dyn Fn()| {
        f();
        (0..7)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    for (label, path, checked) in [("spill", &spill, true), ("plain", &plain, false)] {
        let base = best(&|| drop(fs::read(path).unwrap()));
        let ours = best(&|| drop(read(path, &names, checked).unwrap()));
        let gbps = |s: f64| SIZE as f64 / s / 1e9;
        eprintln!(
            "{label}: fs::read {:.2} GB/s, spill::read {:.2} GB/s, ratio {:.2}",
            gbps(base),
            gbps(ours),
            base / ours
        );
    }
}

/// The permission bits of `path` itself (not following a symlink).
fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn spill_file_carries_its_identity_and_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = sample();
    let mut file = SpillFile::new(dir.path(), 7);
    assert_eq!(file.path(), dir.path().join("7.safetensors"));
    file.write(&tensors).unwrap();
    assert_eq!(mode_of(file.path()), 0o600);

    let bytes = fs::read(file.path()).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let extra = metadata.metadata().as_ref().unwrap();
    let instance = dir.path().file_name().unwrap().to_str().unwrap();
    assert_eq!(extra[INSTANCE_KEY], instance);
    assert_eq!(extra[MODEL_KEY], "7");
    assert_eq!(extra[NONCE_KEY], format!("{:032x}", file.written.unwrap()));

    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let read = file.read_into(&names, None).unwrap();
    for ((name, want), got) in tensors.iter().zip(&read) {
        assert_eq!(raw(got), raw(want), "{name}");
    }
    // Each write draws a new nonce.
    let first = file.written;
    file.write(&tensors).unwrap();
    assert_ne!(file.written, first);
    assert!(file.read_into(&names, None).is_ok());
}

#[test]
fn a_file_not_written_for_this_model_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let names = strings(&["x"]);
    let x = |v: f32| named(vec![("x", Tensor::full([16], v as f64, cpu(Kind::Float)))]);
    let mut mine = SpillFile::new(dir.path(), 1);
    let mut sibling = SpillFile::new(dir.path(), 2);
    let mut foreign = SpillFile::new(other_dir.path(), 1);
    mine.write(&x(1.0)).unwrap();
    sibling.write(&x(2.0)).unwrap();
    foreign.write(&x(3.0)).unwrap();
    let good = fs::read(mine.path()).unwrap();

    // Another model's valid file copied over this one.
    fs::copy(sibling.path(), mine.path()).unwrap();
    let detail = corrupt_detail(mine.read_into(&names, None));
    assert!(detail.contains("belongs to model #2"), "{detail}");

    // Another instance's file for the same model id.
    fs::copy(foreign.path(), mine.path()).unwrap();
    let detail = corrupt_detail(mine.read_into(&names, None));
    assert!(detail.contains("another sire instance"), "{detail}");

    // A forged file with valid checksums but no identity.
    write(mine.path(), &x(4.0)).unwrap();
    let detail = corrupt_detail(mine.read_into(&names, None));
    assert!(detail.contains("names no owner"), "{detail}");

    // A forged file with valid checksums and the right instance and model,
    // but not this write's nonce (an older write of the same model too).
    let forged = Identity { instance: mine.instance.clone(), model: 1, nonce: 42 };
    write_with(mine.path(), &x(5.0), Some(&forged)).unwrap();
    let detail = corrupt_detail(mine.read_into(&names, None));
    assert!(detail.contains("nonce differs"), "{detail}");

    // The genuine file is accepted again.
    fs::write(mine.path(), &good).unwrap();
    let got = mine.read_into(&names, None).unwrap();
    assert!(got[0].equal(&x(1.0)[0].1));

    // A model that never wrote its file reads nothing.
    let fresh = SpillFile::new(dir.path(), 1);
    let detail = corrupt_detail(fresh.read_into(&names, None));
    assert!(detail.contains("never wrote"), "{detail}");
}

#[test]
fn symlinks_and_fifos_are_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let names = strings(&["x"]);
    let x = named(vec![("x", Tensor::ones([8], cpu(Kind::Float)))]);
    let mut file = SpillFile::new(dir.path(), 3);
    file.write(&x).unwrap();
    let real = dir.path().join("real.safetensors");
    fs::rename(file.path(), &real).unwrap();

    // A symlink to the genuine file is still refused: never followed.
    std::os::unix::fs::symlink(&real, file.path()).unwrap();
    let detail = corrupt_detail(file.read_into(&names, None));
    assert!(detail.contains("symbolic link"), "{detail}");
    fs::remove_file(file.path()).unwrap();

    // A FIFO is opened without blocking and refused.
    make_fifo(file.path());
    let detail = corrupt_detail(file.read_into(&names, None));
    assert!(detail.contains("not a regular file"), "{detail}");
}

/// Makes a FIFO at `path` (with `mkfifo(1)`: no libc call in tests).
fn make_fifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {path:?}");
}

#[test]
fn what_is_planted_at_the_temporary_path_is_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("precious");
    fs::write(&target, b"keep me").unwrap();
    let x = named(vec![("x", Tensor::ones([8], cpu(Kind::Float)))]);
    let mut file = SpillFile::new(dir.path(), 4);
    let tmp = dir.path().join("4.safetensors.tmp");

    std::os::unix::fs::symlink(&target, &tmp).unwrap();
    file.write(&x).unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"keep me");
    assert!(!tmp.exists() && fs::symlink_metadata(&tmp).is_err(), "the planted link is gone");
    assert!(file.read_into(&strings(&["x"]), None).is_ok());

    make_fifo(&tmp);
    file.write(&x).unwrap(); // returns: the FIFO is unlinked, not opened
    assert!(file.read_into(&strings(&["x"]), None).is_ok());
    assert_eq!(mode_of(file.path()), 0o600);
}

#[test]
fn a_folder_that_is_no_longer_private_is_not_written_to() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = SpillFile::new(dir.path(), 5);
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let err = file.write(&sample()).unwrap_err();
    assert!(matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::PermissionDenied), "{err:?}");
    assert!(err.to_string().contains("no longer private"), "{err}");
    assert!(!file.path().exists());
}

/// Rewrites `path` with its last byte flipped (same size); returns the bytes
/// it had.
fn flip_last_byte(path: &Path) -> Vec<u8> {
    let bytes = fs::read(path).unwrap();
    let mut changed = bytes.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0x01;
    fs::write(path, &changed).unwrap();
    bytes
}

#[test]
fn a_source_file_that_changed_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src.safetensors");
    let (a, b) = (Tensor::randn([32], cpu(Kind::Float)), Tensor::randn([4, 4], cpu(Kind::Float)));
    Tensor::write_safetensors(&[("a", &a), ("b", &b)], &path).unwrap();
    let (layout, source) = open_source(&path).unwrap();
    assert_eq!(source.path(), fs::canonicalize(&path).unwrap());
    let names: Vec<String> = layout.iter().map(|(n, ..)| n.clone()).collect();
    assert_eq!(names.len(), 2);
    let tensors = source.read_into(&names, None).unwrap(); // the first read records the hashes
    assert!(tensors[names.iter().position(|n| n == "a").unwrap()].equal(&a));
    let got = source.read_into(&strings(&["b", "a"]), None).unwrap();
    assert!(got[0].equal(&b) && got[1].equal(&a));

    // Same size, new bytes, the old modification time put back: the
    // hash of the bytes read the first time catches it.
    let before = fs::metadata(&path).unwrap().modified().unwrap();
    let bytes = flip_last_byte(&path);
    File::options().write(true).open(&path).unwrap().set_modified(before).unwrap();
    let detail = corrupt_detail(source.read_into(&strings(&["a", "b"]), None));
    assert!(detail.contains("changed after the model was loaded"), "{detail}");

    // Same bytes, a new modification time: refused before any copy.
    fs::write(&path, &bytes).unwrap();
    let detail = corrupt_detail(source.read_into(&strings(&["a"]), None));
    assert!(detail.contains("modified at"), "{detail}");

    // Put back exactly: accepted.
    File::options().write(true).open(&path).unwrap().set_modified(before).unwrap();
    assert!(source.read_into(&strings(&["a"]), None).is_ok());
}

#[test]
fn disk_full_is_recognised() {
    assert!(is_disk_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
    assert!(is_disk_full(&io::Error::from_raw_os_error(libc::EDQUOT)));
    assert!(!is_disk_full(&io::Error::from_raw_os_error(libc::EIO)));
}

#[test]
fn private_dir_is_0700_locked_and_removed_on_drop() {
    let root = tempfile::tempdir().unwrap();
    let a = PrivateDir::create(root.path()).unwrap();
    let b = PrivateDir::create(root.path()).unwrap();
    assert_ne!(a.path(), b.path());
    for d in [&a, &b] {
        assert!(d.path().is_absolute());
        let name = d.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("sire-") && name.len() == 5 + 32, "{name}");
        assert_eq!(mode_of(d.path()), 0o700);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0, "nothing but spill files inside");
    }
    // Both live: nothing to reclaim, even from this same process.
    assert_eq!(reclaim(root.path()), 0);
    let path = a.path().to_owned();
    drop(a);
    assert!(!path.exists());
    assert!(b.path().exists());
    // No hidden set-up folder left behind.
    assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
}

#[test]
fn reclaim_removes_only_dead_private_folders_of_this_user() {
    let root = tempfile::tempdir().unwrap();
    let folder = |hex: &str, mode: u32| {
        let p = root.path().join(format!("sire-{hex}"));
        fs::create_dir(&p).unwrap();
        fs::write(p.join("1.safetensors"), b"weights").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let dead = folder(&"a".repeat(32), 0o700);
    let held = folder(&"b".repeat(32), 0o700);
    let open = folder(&"c".repeat(32), 0o755);
    let other_name = folder("12-3", 0o700);
    let outside = tempfile::tempdir().unwrap();
    fs::set_permissions(outside.path(), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(outside.path().join("keep"), b"").unwrap();
    let link = root.path().join(format!("sire-{}", "e".repeat(32)));
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();

    let holder = File::open(&held).unwrap();
    holder.try_lock().unwrap();
    assert_eq!(reclaim(root.path()), 1);
    assert!(!dead.exists());
    for kept in [&held, &open, &other_name] {
        assert!(kept.join("1.safetensors").exists(), "{kept:?}");
    }
    assert!(fs::symlink_metadata(&link).is_ok() && outside.path().join("keep").exists());
    drop(holder);
    // The lock goes with the last descriptor of the open file: a process
    // another test forks meanwhile holds a copy until it executes (the
    // descriptor is close-on-exec), so a dead folder may stay locked a moment.
    let mut reclaimed = reclaim(root.path());
    for _ in 0..100 {
        if reclaimed == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        reclaimed = reclaim(root.path());
    }
    assert_eq!(reclaimed, 1);
    assert!(!held.exists());
}

#[test]
fn kind_conversions_round_trip() {
    for kind in [
        Kind::Float,
        Kind::Double,
        Kind::Half,
        Kind::BFloat16,
        Kind::Int8,
        Kind::Uint8,
        Kind::Int16,
        Kind::Int,
        Kind::Int64,
        Kind::Bool,
    ] {
        let dtype = kind_to_dtype(kind).unwrap();
        assert_eq!(dtype_to_kind(dtype), Some(kind));
        assert_eq!(dtype.bitsize(), 8 * kind.elt_size_in_bytes());
    }
    for kind in [Kind::ComplexFloat, Kind::QInt8, Kind::Float8e5m2] {
        assert!(kind_to_dtype(kind).is_err());
    }
    assert_eq!(dtype_to_kind(Dtype::U32), None);
    assert_eq!(parse_checksum("00000000000000ff"), Some(255));
    assert_eq!(parse_checksum("00000000000000FF"), None);
    assert_eq!(parse_checksum("+0000000000000ff"), None);
    assert_eq!(parse_checksum("ff"), None);
}

/// The mappings of `path` in this process (lines of `/proc/self/maps`).
fn mappings_of(path: &Path) -> usize {
    let path = fs::canonicalize(path).unwrap();
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().filter(|l| l.ends_with(path.to_str().unwrap())).count()
}

#[test]
fn mapped_tensors_are_bit_identical_and_point_into_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.spill");
    let tensors = sample();
    write(&path, &tensors).unwrap();
    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let mapped = map(&path, &names, true).unwrap().expect("a spill file is aligned");
    for ((name, want), got) in tensors.iter().zip(&mapped) {
        assert_eq!(raw(got), raw(want), "{name}");
        assert_eq!((got.kind(), got.size()), (want.kind(), want.size()), "{name}");
    }
    assert_eq!(mappings_of(&path), 1, "one mapping of the file, shared by the tensors");
    // A write copies the page: the tensor changes, the file does not.
    let before = fs::read(&path).unwrap();
    let _ = mapped[1].shallow_clone().fill_(7.0);
    assert_eq!(mapped[1].double_value(&[0, 0]), 7.0);
    assert_eq!(fs::read(&path).unwrap(), before);
    // The mapping lives as long as any tensor over it, on any thread.
    let keep = mapped[2].shallow_clone();
    drop(mapped);
    assert_eq!(mappings_of(&path), 1);
    let want = raw(&tensors[2].1);
    std::thread::spawn(move || assert_eq!(raw(&keep), want)).join().unwrap();
    assert_eq!(mappings_of(&path), 0, "unmapped with the last tensor");
}

#[test]
fn mapping_checks_what_reading_checks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.spill");
    write(&path, &sample()).unwrap();
    let names = strings(&["f32", "f64"]);
    // A flipped byte in the data: the checksum catches it before any tensor is made.
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let all = strings(&["u8", "f32", "f64", "f16", "bf16", "i64", "bool"]);
    let all: Vec<String> = all.into_iter().filter(|n| sample().iter().any(|(m, _)| m == n)).collect();
    let detail = corrupt_detail(map(&path, &all, true));
    assert!(detail.contains("checksum mismatch"), "{detail}");
    assert_eq!(mappings_of(&path), 0, "nothing kept mapped after an error");
    // A truncated file is an error, not a SIGBUS.
    write(&path, &sample()).unwrap();
    let full = fs::metadata(&path).unwrap().len();
    File::options().write(true).open(&path).unwrap().set_len(full - 64).unwrap();
    assert!(matches!(map(&path, &names, true), Err(Error::Corrupt { .. })));
}

#[test]
fn a_file_with_misaligned_tensors_is_not_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.safetensors");
    // 3 bytes of u8 first: the f32 after it starts 3 bytes into the data
    // (a valid file that safetensors' own writer would not lay out).
    let b = Tensor::from_slice(&[1.5f32, -2.0, 3.25, 0.0]);
    let header = br#"{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"b":{"dtype":"F32","shape":[4],"data_offsets":[3,19]}}"#;
    let mut header = header.to_vec();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(&[1, 2, 3]);
    file.extend_from_slice(&raw(&b));
    fs::write(&path, &file).unwrap();
    assert!(map(&path, &strings(&["a", "b"]), false).unwrap().is_none());
    let read = read(&path, &strings(&["a", "b"]), false).unwrap();
    assert!(read[1].equal(&b));
}

#[test]
fn a_mapped_source_is_known_by_its_stamp_and_any_change_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src.safetensors");
    let (a, b) = (Tensor::randn([1024], cpu(Kind::Float)), Tensor::randn([64, 4], cpu(Kind::Float)));
    Tensor::write_safetensors(&[("a", &a), ("b", &b)], &path).unwrap();
    let (_, source) = open_source(&path).unwrap();
    let names = strings(&["a", "b"]);
    let got = source.map(&names).unwrap().unwrap();
    assert!(got[0].equal(&a) && got[1].equal(&b));
    let stamp = source.state.verified.lock().expect("the first map records the file's stamp");
    assert!(source.state.sums.lock().is_empty(), "a mapping hashes nothing");
    drop(got);
    // Unchanged: mapped again at once.
    assert!(source.map(&names).unwrap().unwrap()[0].equal(&a));
    assert_eq!(*source.state.verified.lock(), Some(stamp));

    // New bytes, the old modification time put back: the change time
    // differs, so the file is refused, mapped or read.
    let before = fs::metadata(&path).unwrap().modified().unwrap();
    let bytes = flip_last_byte(&path);
    File::options().write(true).open(&path).unwrap().set_modified(before).unwrap();
    let detail = corrupt_detail(source.map(&names));
    assert!(detail.contains("changed after the model was loaded"), "{detail}");
    let detail = corrupt_detail(source.read_into(&names, None));
    assert!(detail.contains("changed after the model was loaded"), "{detail}");
    // Even the same bytes put back: without hashes nothing can tell, so the
    // file stays refused (a copied first read records hashes and would
    // accept it: `a_source_file_that_changed_is_corrupt`).
    fs::write(&path, &bytes).unwrap();
    File::options().write(true).open(&path).unwrap().set_modified(before).unwrap();
    assert!(matches!(source.map(&names), Err(Error::Corrupt { .. })));
    // Another file renamed over it (a new inode): refused too.
    let other = dir.path().join("other.safetensors");
    fs::write(&other, &bytes).unwrap();
    File::options().write(true).open(&other).unwrap().set_modified(before).unwrap();
    fs::rename(&other, &path).unwrap();
    assert!(matches!(source.map(&names), Err(Error::Corrupt { .. })));
}

#[test]
fn parts_of_one_source_read_their_own_tensors_and_share_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src.safetensors");
    let (a, b) = (Tensor::randn([256], cpu(Kind::Float)), Tensor::randn([64], cpu(Kind::Float)));
    Tensor::write_safetensors(&[("a", &a), ("b", &b)], &path).unwrap();
    let (_, source) = open_source(&path).unwrap();
    let other = source.clone(); // another part over the same file
                                // Copied reads of disjoint subsets each record their own hashes.
    assert!(source.read_into(&strings(&["a"]), None).unwrap()[0].equal(&a));
    assert!(other.read_into(&strings(&["b"]), None).unwrap()[0].equal(&b));
    assert!(source.read_into(&strings(&["b", "a"]), None).unwrap()[0].equal(&b));
    // A mapped read of one part after a change is refused for the other too.
    flip_last_byte(&path);
    assert!(matches!(other.map(&strings(&["a"])), Err(Error::Corrupt { .. })));
    assert!(matches!(source.read_into(&strings(&["b"]), None), Err(Error::Corrupt { .. })));
}

/// A mapped read maps the bytes of the tensors it reads, not the whole file:
/// neither the header's page nor the neighbours' pages (in the page cache,
/// which the kernel maps around a fault) count in its resident set.
#[test]
fn a_mapped_read_maps_only_its_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three.safetensors");
    let n = (MIB / 4) as i64;
    let ts = named(vec![
        ("a", Tensor::full([n], 1.0, cpu(Kind::Float))),
        ("b", Tensor::full([n], 2.0, cpu(Kind::Float))),
        ("c", Tensor::full([n], 3.0, cpu(Kind::Float))),
    ]);
    Tensor::write_safetensors(&ts, &path).unwrap();
    // Every page of the file in the page cache.
    let _ = std::fs::read(&path).unwrap();
    let got = map(&path, &strings(&["b"]), false).unwrap().expect("mapped");
    let b = &got[0];
    assert_eq!(b.sum(Kind::Double).double_value(&[]), 2.0 * n as f64, "every page read");
    let page = page_size();
    let (size, rss) = ffi::mapping_of(b.data_ptr() as usize);
    assert!(size >= MIB as usize && size <= MIB as usize + 2 * page, "a mapping of {size} bytes for 1 MiB");
    assert!(rss <= MIB + 2 * page as u64, "{rss} bytes resident for 1 MiB");
}
