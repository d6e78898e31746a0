//! The model registry against a real HTTP server on 127.0.0.1 (and
//! `file://`): downloads and their faults, the catalogue, the cache's
//! safety, the hub cache shared with the Python `huggingface_hub`, and load
//! by key.

mod common;
#[path = "common/http.rs"]
mod http;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use http::{Fault, Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sire::registry::{FileState, Filter, ModelType, Registry, RegistryBuilder};
use sire::Error;
use tch::Tensor;

/// Deterministic bytes that are not a pickle or a zip.
fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + seed as usize * 7) % 251) as u8 ^ 0x5a).collect()
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// A catalogue entry with one file.
fn entry(model_type: &str, path: &str, sha256: Option<&str>, url: &str) -> Value {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    let mut file = json!({ "path": path });
    if let Some(s) = sha256 {
        file["sha256"] = json!(s);
    }
    json!({
        "type": model_type,
        "config": {
            "files": [file],
            "download": [{ "file_name": name, "file_path": dir, "file_url": url }]
        }
    })
}

fn write_catalogue(dir: &Path, name: &str, catalogue: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(catalogue).unwrap()).unwrap();
    path
}

/// A registry on private caches under `dir`, no environment, fast retries.
fn builder(dir: &Path, server: Option<&Server>) -> RegistryBuilder {
    let mut b = Registry::builder()
        .env(false)
        .cache_dir(dir.join("cache"))
        .hf_cache_dir(dir.join("hf"))
        .progress(false)
        .retries(3)
        .backoff(Duration::from_millis(10))
        .timeout(Duration::from_secs(20));
    if let Some(s) = server {
        b = b.hf_endpoint(s.endpoint());
    }
    b
}

fn one_model(dir: &Path, server: &Server, key: &str, body: &[u8], fault: Fault) -> (Registry, String) {
    let route = format!("/files/{key}.bin");
    server.add(&route, body.to_vec(), fault);
    let cat = write_catalogue(
        dir,
        "catalogue.json",
        &json!({ key: entry("safetensors", &format!("{key}/{key}.bin"), Some(&sha(body)), &server.url(&route)) }),
    );
    (builder(dir, Some(server)).catalogue(cat).build().unwrap(), route)
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(leftovers(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn downloads_validates_and_keeps_files_private() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(300_000, 1);
    let (reg, route) = one_model(dir.path(), &server, "m", &body, Fault::None);

    let before = reg.validate("m").unwrap();
    assert!(!before.available);
    assert_eq!(before.files[0].state, FileState::Missing);
    assert!(matches!(reg.path("m"), Err(Error::NotDownloaded { .. })));

    let paths = reg.download("m").unwrap();
    let expected = dir.path().join("cache/safetensors/m/m.bin");
    assert_eq!(paths, std::slice::from_ref(&expected));
    assert_eq!(std::fs::read(&expected).unwrap(), body);
    let mode = std::fs::metadata(&expected).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "cache files are readable by the user only");
    assert!(reg.validate("m").unwrap().available);
    assert_eq!(reg.path("m").unwrap(), expected);
    let listed = reg.list(&Filter::new().available(true)).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, body.len() as u64);

    // Present and valid: no network at all.
    reg.download("m").unwrap();
    assert_eq!(server.gets(&route), 1);
    assert!(!leftovers(&dir.path().join("cache/safetensors"))
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".incomplete")));

    // remove: the file goes, and the model is not available any more.
    assert_eq!(reg.remove("m").unwrap(), body.len() as u64);
    assert!(!expected.exists());
    assert_eq!(reg.validate("m").unwrap().files[0].state, FileState::Missing);
}

#[test]
fn resumes_after_a_cut_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(500_000, 2);
    let (reg, route) =
        one_model(dir.path(), &server, "cut", &body, Fault::CutAfter { bytes: 200_000, times: 1 });
    let path = reg.download("cut").unwrap().remove(0);
    assert_eq!(std::fs::read(path).unwrap(), body, "the resumed file is whole");
    let gets: Vec<_> = server.seen().into_iter().filter(|s| s.path == route).collect();
    assert_eq!(gets.len(), 2, "one cut GET, one resumed GET: {gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(
        gets[1].range.as_deref(),
        Some("bytes=200000-"),
        "the second GET resumes where the cut left off"
    );
}

#[test]
fn retries_after_503() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(10_000, 3);
    let (reg, route) = one_model(dir.path(), &server, "busy", &body, Fault::Status { code: 503, times: 2 });
    reg.download("busy").unwrap();
    assert_eq!(server.gets(&route), 3, "two 503s, then the file");
    assert!(reg.validate("busy").unwrap().available);
}

#[test]
fn http_404_fails_at_once_naming_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let (reg, route) = one_model(dir.path(), &server, "gone", b"x", Fault::Always(404));
    match reg.download("gone") {
        Err(Error::Http { key, method, url, status, .. }) => {
            assert_eq!((key.as_str(), method, status), ("gone", "GET", 404));
            assert!(url.ends_with(&route), "{url}");
        }
        other => panic!("expected HTTP 404, got {other:?}"),
    }
    assert_eq!(server.gets(&route), 1, "a 404 is not retried");
    assert!(!reg.validate("gone").unwrap().available);
}

#[test]
fn checksum_mismatch_names_both_hashes_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(50_000, 4);
    let wrong = payload(50_000, 5);
    server.add("/files/w.bin", wrong.clone(), Fault::None);
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({ "w": entry("safetensors", "w/w.bin", Some(&sha(&body)), &server.url("/files/w.bin")) }),
    );
    let reg = builder(dir.path(), Some(&server)).catalogue(cat).build().unwrap();
    let err = reg.download("w").unwrap_err();
    let msg = err.to_string();
    match err {
        Error::HashMismatch { expected, actual, removed, size, .. } => {
            assert_eq!(expected, sha(&body));
            assert_eq!(actual, sha(&wrong));
            assert!(removed);
            assert_eq!(size, wrong.len() as u64);
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert!(msg.contains(&sha(&body)) && msg.contains(&sha(&wrong)), "{msg}");
    assert_eq!(leftovers(&dir.path().join("cache/safetensors")), Vec::<PathBuf>::new(), "nothing kept");
}

#[test]
fn truncated_body_fails_after_retries_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(100_000, 6);
    let (reg, route) = one_model(dir.path(), &server, "short", &body, Fault::Truncated(40_000));
    match reg.download("short") {
        Err(Error::Download { attempts, reason, .. }) => {
            // One request that brought 40000 bytes, then four without
            // progress: three retries in a row.
            assert_eq!(attempts, 5);
            assert!(reason.contains("after 40000 bytes") || reason.contains("40000 of 100000"), "{reason}");
        }
        other => panic!("expected a failed download, got {other:?}"),
    }
    assert!(!dir.path().join("cache/safetensors/short/short.bin").exists(), "nothing renamed into place");
    // The server mends; the next download resumes the partial file.
    server.add(&route, body.clone(), Fault::None);
    let path = reg.download("short").unwrap().remove(0);
    assert_eq!(std::fs::read(path).unwrap(), body);
    assert_eq!(server.seen().last().unwrap().range.as_deref(), Some("bytes=40000-"));
}

#[test]
fn body_over_the_size_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(200_000, 7);
    server.add("/big/announced", Vec::new(), Fault::ClaimsLength(10 << 30));
    server.add("/big/streamed", body.clone(), Fault::NoLength);
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({
            "announced": entry("safetensors", "a/a.bin", Some(&sha(&body)), &server.url("/big/announced")),
            "streamed": entry("safetensors", "s/s.bin", Some(&sha(&body)), &server.url("/big/streamed")),
        }),
    );
    let reg = builder(dir.path(), Some(&server)).catalogue(cat).max_download_size(100_000).build().unwrap();
    for key in ["announced", "streamed"] {
        match reg.download(key) {
            Err(Error::DownloadTooLarge { size, limit, .. }) => {
                assert_eq!(limit, 100_000);
                assert!(size > limit, "{key}: {size}");
            }
            other => panic!("{key}: expected too large, got {other:?}"),
        }
    }
    assert_eq!(leftovers(&dir.path().join("cache/safetensors")), Vec::<PathBuf>::new(), "nothing kept");
}

/// Runs as the parent (starting the server and a child process) or, with
/// `SIRE_TEST_CHILD` set, as the child: both download one slow file at once.
#[test]
fn two_processes_download_one_file_once() {
    if let Ok(spec) = std::env::var("SIRE_TEST_CHILD") {
        let (cat, dir) = spec.split_once('|').unwrap();
        let reg = builder(Path::new(dir), None).catalogue(cat).build().unwrap();
        reg.download("shared").unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(1 << 20, 8);
    let slow = Fault::Slow { chunk: 64 << 10, delay: Duration::from_millis(40) };
    let (reg, route) = one_model(dir.path(), &server, "shared", &body, slow);
    let cat = dir.path().join("catalogue.json");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "two_processes_download_one_file_once", "--test-threads=1", "--quiet"])
        .env("SIRE_TEST_CHILD", format!("{}|{}", cat.display(), dir.path().display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let the child start its download, then start this one while it runs.
    let t0 = std::time::Instant::now();
    while server.gets(&route) == 0 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let path = reg.download("shared").unwrap().remove(0);
    assert!(child.wait().unwrap().success(), "the child's download failed");
    assert_eq!(server.gets(&route), 1, "downloaded once for both processes");
    assert_eq!(std::fs::read(path).unwrap(), body, "intact");
}

#[test]
fn broken_catalogue_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.json");
    std::fs::write(&path, "{\n  \"a\": {\"type\": \"torchscript\",}\n}\n").unwrap();
    let err = builder(dir.path(), None).catalogue(&path).build().unwrap_err();
    match &err {
        Error::Catalogue { path: p, line, column, .. } => {
            assert_eq!(p, &path);
            assert_eq!((*line, *column), (2, 31), "at the `}}` after the trailing comma");
        }
        other => panic!("expected a catalogue error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("broken.json") && msg.contains("line 2, column 31"), "{msg}");
    // A catalogue that cannot be read names the file and the reason.
    let err = builder(dir.path(), None).catalogue(dir.path().join("absent.json")).build().unwrap_err();
    assert!(matches!(&err, Error::Catalogue { line: 0, .. }), "{err:?}");
    assert!(err.to_string().contains("absent.json\": No such file"), "{err}");
}

#[test]
fn unknown_fields_are_kept_and_filterable_and_later_catalogues_win() {
    let dir = tempfile::tempdir().unwrap();
    let url = "file:///nonexistent/x.bin";
    let mut a = entry("torchscript", "a/x.pt", Some(&sha(b"a")), url);
    a["license"] = json!("mit");
    a["tags"] = json!(["vision", "small"]);
    a["config"]["files"][0]["note"] = json!("kept");
    a["config"]["input_size"] = json!(224);
    let first = write_catalogue(
        dir.path(),
        "first.json",
        &json!({ "a": a, "b": entry("onnx", "b/x.onnx", Some(&sha(b"b")), url) }),
    );
    let mut b2 = entry("safetensors", "b/x.safetensors", Some(&sha(b"b2")), url);
    b2["description"] = json!("the second b");
    let second = write_catalogue(dir.path(), "second.json", &json!({ "b": b2 }));
    let reg = builder(dir.path(), None).catalogue(&first).catalogue(&second).build().unwrap();

    let a = reg.entry("a").unwrap();
    assert_eq!(a.metadata["license"], "mit");
    assert_eq!(a.metadata["input_size"], 224);
    assert_eq!(a.files[0].extra["note"], "kept");
    let by_tag = reg.list(&Filter::new().metadata("tags", "vision")).unwrap();
    assert_eq!(by_tag.iter().map(|l| l.entry.key.as_str()).collect::<Vec<_>>(), ["a"]);
    assert!(reg.list(&Filter::new().metadata("license", "apache-2.0")).unwrap().is_empty());
    assert_eq!(reg.list(&Filter::new().model_type(ModelType::TorchScript)).unwrap().len(), 1);
    assert_eq!(reg.list(&Filter::new().text("SECOND")).unwrap()[0].entry.key, "b");

    let b = reg.entry("b").unwrap();
    assert_eq!(b.model_type, ModelType::SafeTensors, "the later catalogue wins");
    assert_eq!(reg.overrides().len(), 1);
    assert_eq!((reg.overrides()[0].previous.clone(), reg.overrides()[0].now.clone()), (first, second));
    assert!(matches!(reg.entry("c"), Err(Error::NotInCatalogue { known, .. }) if known == ["a", "b"]));
}

/// Drops this thread's capabilities that bypass file permissions (tests run
/// as root in CI), restoring them on drop.
struct NoDacOverride(Option<[libc::c_uint; 6]>);

impl NoDacOverride {
    fn new() -> Self {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return NoDacOverride(None);
        }
        let mut hdr = [0x2008_0522u32, 0]; // _LINUX_CAPABILITY_VERSION_3, this thread
        let mut caps = [0 as libc::c_uint; 6];
        // SAFETY: capget/capset take a header and two data structs (3 u32 each).
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_capget, hdr.as_mut_ptr(), caps.as_mut_ptr()), 0);
            let saved = caps;
            caps[0] &= !((1 << 1) | (1 << 2) | (1 << 3)); // DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER
            assert_eq!(libc::syscall(libc::SYS_capset, hdr.as_mut_ptr(), caps.as_ptr()), 0);
            NoDacOverride(Some(saved))
        }
    }
}

impl Drop for NoDacOverride {
    fn drop(&mut self) {
        if let Some(saved) = self.0 {
            let mut hdr = [0x2008_0522u32, 0];
            // SAFETY: as in `new`.
            unsafe { libc::syscall(libc::SYS_capset, hdr.as_mut_ptr(), saved.as_ptr()) };
        }
    }
}

#[test]
fn read_only_cache_directory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(20_000, 9);
    let (reg, _) = one_model(dir.path(), &server, "ro", &body, Fault::None);
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o500)).unwrap();
    let result = {
        let _caps = NoDacOverride::new();
        reg.download("ro")
    };
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    match result {
        Err(Error::Cache { path, source }) => {
            assert!(path.starts_with(&cache), "{path:?}");
            assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
        }
        other => panic!("expected a cache error, got {other:?}"),
    }
    // A cache made read-only after the download still validates and serves.
    reg.download("ro").unwrap();
    std::fs::remove_dir_all(cache.join(".validated")).unwrap();
    for d in [cache.join("safetensors/ro"), cache.join("safetensors"), cache.clone()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o500)).unwrap();
    }
    let v = {
        let _caps = NoDacOverride::new();
        reg.validate("ro")
    };
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(v.unwrap().available, "validated without writing a sidecar");
}

#[test]
fn paths_escaping_the_cache_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    server.add("/x", b"x".to_vec(), Fault::None);
    let h = sha(b"x");
    for (name, bad) in [
        ("dotdot", json!({"e": entry("safetensors", "../../outside.bin", Some(&h), &server.url("/x"))})),
        ("absolute", json!({"e": entry("safetensors", "/tmp/outside.bin", Some(&h), &server.url("/x"))})),
        (
            "download",
            json!({"e": {"type": "lora", "config": {"download": [{"file_name": "x", "file_path": "a/../..", "file_url": server.url("/x")}]}}}),
        ),
        ("hub", json!({"e": entry("lora", "x.bin", Some(&h), "hf://org/repo/../../x.bin")})),
    ] {
        let cat = write_catalogue(dir.path(), &format!("{name}.json"), &bad);
        match builder(dir.path(), None).catalogue(cat).build() {
            Err(Error::UnsafePath { key, reason, .. }) => {
                assert_eq!(key, "e", "{name}: {reason}");
                assert!(reason.contains(&format!("{name}.json")), "the catalogue file is named: {reason}");
            }
            other => panic!("{name}: expected an unsafe path, got {other:?}"),
        }
    }
    // A symlink planted in the cache does not lead the download out of it.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(dir.path().join("cache/safetensors")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.path().join("cache/safetensors/m")).unwrap();
    let cat = write_catalogue(
        dir.path(),
        "ok.json",
        &json!({"m": entry("safetensors", "m/w.bin", Some(&h), &server.url("/x"))}),
    );
    let reg = builder(dir.path(), None).catalogue(cat).build().unwrap();
    assert!(matches!(reg.download("m"), Err(Error::UnsafePath { .. })));
    let v = reg.validate("m").unwrap();
    assert_eq!(v.files[0].state, FileState::Error);
    assert!(v.files[0].error.as_deref().unwrap().contains("symlink"), "{:?}", v.files[0].error);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written through the link");
    assert_eq!(server.gets("/x"), 0);
}

#[test]
fn pickles_and_unhashed_files_need_an_explicit_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let pickle = [&[0x80u8, 0x04, 0x95][..], &payload(100, 10)].concat();
    server.add("/p.bin", pickle.clone(), Fault::None);
    server.add("/u.bin", b"no hash".to_vec(), Fault::None);
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({
            "pickled": entry("safetensors", "p/p.bin", Some(&sha(&pickle)), &server.url("/p.bin")),
            "unhashed": entry("safetensors", "u/u.bin", None, &server.url("/u.bin")),
        }),
    );
    let strict = builder(dir.path(), Some(&server)).catalogue(&cat).build().unwrap();
    assert!(matches!(strict.download("pickled"), Err(Error::Pickle { what, .. }) if what.contains("pickle")));
    assert_eq!(strict.validate("pickled").unwrap().files[0].state, FileState::Pickle);
    assert!(matches!(strict.download("unhashed"), Err(Error::Unhashed { file, .. }) if file == "u/u.bin"));
    assert_eq!(server.gets("/u.bin"), 0, "refused before any download");

    let lax = builder(dir.path(), Some(&server))
        .catalogue(&cat)
        .allow_pickle(true)
        .allow_unhashed(true)
        .build()
        .unwrap();
    lax.download("pickled").unwrap();
    lax.download("unhashed").unwrap();
    assert!(lax.validate("pickled").unwrap().available);
    let u = lax.validate("unhashed").unwrap();
    assert_eq!(u.files[0].state, FileState::Unhashed);
    assert!(u.available);
    assert!(!strict.validate("unhashed").unwrap().available);
}

#[test]
fn sidecar_is_trusted_until_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(4096, 11);
    let (reg, _) = one_model(dir.path(), &server, "s", &body, Fault::None);
    let path = reg.download("s").unwrap().remove(0);
    assert_eq!(reg.validate("s").unwrap().files[0].state, FileState::Valid);
    // The sidecar answers while the file is untouched: a forged one is believed.
    let sidecars: Vec<_> =
        std::fs::read_dir(dir.path().join("cache/.validated")).unwrap().flatten().collect();
    assert_eq!(sidecars.len(), 1);
    let side = sidecars[0].path();
    let text = std::fs::read_to_string(&side).unwrap();
    std::fs::write(&side, text.replace(&sha(&body), &"0".repeat(64))).unwrap();
    assert_eq!(reg.validate("s").unwrap().files[0].state, FileState::Mismatch, "the sidecar was used");
    std::fs::write(&side, &text).unwrap();
    assert_eq!(reg.validate("s").unwrap().files[0].state, FileState::Valid);
    // Same size, same mtime, other bytes: the change time gives it away.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let mut other = body.clone();
    other[0] ^= 1;
    std::fs::write(&path, &other).unwrap();
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(reg.validate("s").unwrap().files[0].state, FileState::Mismatch);
    // A new mtime too.
    f_touch(&path, mtime + Duration::from_secs(5));
    assert_eq!(reg.validate("s").unwrap().files[0].state, FileState::Mismatch);
    assert!(matches!(reg.path("s"), Err(Error::HashMismatch { removed: false, .. })));
    // download replaces the mismatching file.
    reg.download("s").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
}

fn f_touch(path: &Path, t: std::time::SystemTime) {
    std::fs::File::options().write(true).open(path).unwrap().set_modified(t).unwrap();
}

fn python() -> PathBuf {
    std::env::var_os("VIRTUAL_ENV")
        .map_or_else(|| PathBuf::from("python3"), |v| Path::new(&v).join("bin/python"))
}

/// `hf_hub_download` of the real Python client against the test server;
/// prints the path and the sha256 of what it reads there.
fn python_download(
    server: &Server,
    hf_cache: &Path,
    home: &Path,
    repo: &str,
    file: &str,
    revision: &str,
) -> (PathBuf, String) {
    let code = "import sys, hashlib\n\
                from huggingface_hub import hf_hub_download\n\
                p = hf_hub_download(repo_id=sys.argv[1], filename=sys.argv[2], revision=sys.argv[3])\n\
                print(p)\n\
                print(hashlib.sha256(open(p, 'rb').read()).hexdigest())\n";
    let out = Command::new(python())
        .args(["-c", code, repo, file, revision])
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_HUB_CACHE", hf_cache)
        .env("HF_HOME", home)
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .expect("run the venv's python");
    assert!(out.status.success(), "huggingface_hub failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    (PathBuf::from(lines.next().unwrap()), lines.next().unwrap().to_string())
}

#[test]
fn hub_cache_is_shared_with_python_huggingface_hub() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let body = payload(70_000, 12);
    let h = sha(&body);
    let resolve =
        server.add_hub_file("org/net", "main", commit, "weights/model.safetensors", body.clone(), &h);
    let cat = write_catalogue(
        dir.path(),
        "hub.json",
        &json!({"net": entry("safetensors", "net/model.safetensors", Some(&h), "hf://org/net/weights/model.safetensors@main")}),
    );

    // Python first: sire finds its file without a request.
    let hf_a = dir.path().join("hf-a");
    let (py_path, py_sha) = python_download(
        &server,
        &hf_a,
        &dir.path().join("home"),
        "org/net",
        "weights/model.safetensors",
        "main",
    );
    assert_eq!(py_sha, h);
    let requests = server.seen().len();
    let reg = builder(dir.path(), Some(&server)).hf_cache_dir(&hf_a).catalogue(&cat).build().unwrap();
    assert_eq!(reg.download("net").unwrap(), std::slice::from_ref(&py_path));
    assert_eq!(server.seen().len(), requests, "no request: the Python client's file is used as is");
    assert!(reg.validate("net").unwrap().available);

    // sire first: the layout is the client's, and the client finds the file.
    let hf_b = dir.path().join("hf-b");
    let reg = builder(dir.path(), Some(&server)).hf_cache_dir(&hf_b).catalogue(&cat).build().unwrap();
    let gets = server.gets(&resolve);
    let ours = reg.download("net").unwrap().remove(0);
    assert_eq!(server.gets(&resolve), gets + 1);
    let repo = hf_b.join("models--org--net");
    assert_eq!(ours, repo.join("snapshots").join(commit).join("weights/model.safetensors"));
    assert_eq!(
        std::fs::read_link(&ours).unwrap(),
        Path::new("../../../blobs").join(&h),
        "relative link to the blob"
    );
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), commit);
    let blob = repo.join("blobs").join(&h);
    assert_eq!(std::fs::metadata(&blob).unwrap().permissions().mode() & 0o777, 0o600);
    let (py_path, py_sha) = python_download(
        &server,
        &hf_b,
        &dir.path().join("home"),
        "org/net",
        "weights/model.safetensors",
        "main",
    );
    assert_eq!((py_path, py_sha), (ours, h));
    assert_eq!(server.gets(&resolve), gets + 1, "the Python client did not download it again");

    // cache_usage reports the shared repository.
    let usage = reg.cache_usage();
    assert_eq!(usage.hf.len(), 1);
    assert_eq!((usage.hf[0].repo.as_str(), usage.hf[0].size), ("org/net", body.len() as u64));
    assert_eq!(usage.hf[0].used_by, ["net"]);

    // remove drops the link and the blob no other snapshot uses.
    assert_eq!(reg.remove("net").unwrap(), body.len() as u64);
    assert!(!blob.exists());
}

#[test]
fn hub_redirect_to_a_cdn_keeps_the_token_on_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, cdn) = (Server::start(), Server::start());
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let body = payload(30_000, 13);
    let h = sha(&body);
    cdn.add("/lfs/blob", body.clone(), Fault::None);
    let resolve =
        hub.add_hub_redirect("org/big", "v1", commit, "model.safetensors", &cdn.url("/lfs/blob"), &body);
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({"big": entry("safetensors", "big/model.safetensors", Some(&h), "hf://org/big/model.safetensors@v1")}),
    );
    let reg = builder(dir.path(), Some(&hub)).hf_token(Some("secret".into())).catalogue(cat).build().unwrap();
    let path = reg.download("big").unwrap().remove(0);
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let repo = dir.path().join("hf/models--org--big");
    assert_eq!(
        std::fs::read_link(&path).unwrap(),
        Path::new("../../blobs").join(&h),
        "the blob is named by X-Linked-Etag"
    );
    assert_eq!(std::fs::read_to_string(repo.join("refs/v1")).unwrap(), commit);
    let heads: Vec<_> = hub.seen().into_iter().filter(|s| s.path == resolve).collect();
    assert_eq!(heads.len(), 1);
    assert_eq!(
        (heads[0].method.as_str(), heads[0].authorization.as_deref()),
        ("HEAD", Some("Bearer secret"))
    );
    let gets = cdn.seen();
    assert_eq!(gets.len(), 1);
    assert_eq!(
        (gets[0].method.as_str(), gets[0].authorization.as_deref()),
        ("GET", None),
        "no token to the CDN"
    );

    // Offline (HF_HUB_OFFLINE), a file not in the cache is not fetched.
    let other = dir.path().join("other-hf");
    let offline = builder(dir.path(), Some(&hub))
        .hf_cache_dir(&other)
        .offline(true)
        .catalogue(dir.path().join("c.json"));
    let offline = offline.build().unwrap();
    let before = hub.seen().len();
    assert!(matches!(offline.download("big"), Err(Error::NotDownloaded { .. })));
    assert_eq!(hub.seen().len(), before, "no request offline");
    // A 404 from the hub's resolution is a HEAD error.
    let missing = write_catalogue(
        dir.path(),
        "missing.json",
        &json!({"nope": entry("safetensors", "n/x.safetensors", Some(&h), "hf://org/nope/x.safetensors")}),
    );
    let reg = builder(dir.path(), Some(&hub)).catalogue(missing).build().unwrap();
    assert!(matches!(reg.download("nope"), Err(Error::Http { method: "HEAD", status: 404, .. })));
}

#[test]
fn round_trip_torchscript_safetensors_and_lora_load_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let ts = std::fs::read(data("ts_buffers.pt")).unwrap();
    server.add("/ts.pt", ts.clone(), Fault::None);
    tch::manual_seed(3);
    let w = Tensor::randn([64, 32], tch::kind::FLOAT_CPU);
    let b = Tensor::arange(10, (tch::Kind::Int64, tch::Device::Cpu));
    let st_path = dir.path().join("sd.safetensors");
    Tensor::write_safetensors(&[("layer.weight", &w), ("layer.index", &b)], &st_path).unwrap();
    let st = std::fs::read(&st_path).unwrap();
    server.add("/sd.safetensors", st.clone(), Fault::None);
    let lora = data("peft/kohya/lora.safetensors");
    let lora_sha = sire::registry::sha256_file(&lora).unwrap();
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({
            "ts": entry("TorchScript", "ts/model.pt", Some(&sha(&ts)), &server.url("/ts.pt")),
            "sd": entry("safetensors", "sd/model.safetensors", Some(&sha(&st)), &server.url("/sd.safetensors")),
            "adapter": entry("lora", "adapter/lora.safetensors", Some(&lora_sha), &format!("file://{}", lora.display())),
        }),
    );
    let (pools, _spill) = common::pools(64 * common::MIB);
    let reg = builder(dir.path(), Some(&server)).catalogue(cat).pools(pools).build().unwrap();

    let m = reg.load("ts").unwrap();
    let module = m.torchscript().expect("a TorchScript model");
    let io = Tensor::read_safetensors(data("ts_buffers_io.safetensors")).unwrap();
    let get = |n: &str| io.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    {
        let g = sire::auto_manage(module).unwrap();
        let y = g.forward_ts(&[get("x")]).unwrap();
        assert!(y.allclose(&get("y"), 1e-6, 1e-6, false), "PyTorch's output");
    }
    let sd = reg.load("sd").unwrap();
    let set = sd.tensors().expect("a state dict");
    {
        let g = sire::auto_manage(set).unwrap();
        assert!(g.get("layer.weight").unwrap().equal(&w));
        assert!(g.get("layer.index").unwrap().equal(&b));
    }
    let adapter = reg.load("adapter").unwrap();
    let base = sire::TensorSet::from_safetensors(data("peft/kohya/base.safetensors")).unwrap();
    assert!(adapter.lora().expect("an adapter").to_commit(base.names(), 1.0).is_ok());

    for key in ["ts", "sd", "adapter"] {
        assert!(reg.validate(key).unwrap().available, "{key} validates after its load");
    }
    // Loading again returns the same model; loaded_models tells where each is.
    assert_eq!(reg.load("sd").unwrap().tensors().unwrap().name(), "sd");
    assert_eq!(server.gets("/sd.safetensors"), 1);
    let loaded = reg.loaded_models();
    let keys: Vec<_> = loaded.iter().map(|l| (l.key.as_str(), l.location)).collect();
    assert_eq!(
        keys,
        [("adapter", None), ("sd", Some(sire::Location::Cpu)), ("ts", Some(sire::Location::Cpu))]
    );
    module.offload().unwrap();
    let ts_now = reg.loaded_models().into_iter().find(|l| l.key == "ts").unwrap();
    assert_eq!(ts_now.location, Some(sire::Location::Disk));
    assert!(ts_now.path.ends_with("torchscript/ts/model.pt"));
}

// ---- Security review regressions ----

/// A registry with a hub token whose endpoint is `hub`.
fn with_token(dir: &Path, hub: &Server, cat: PathBuf) -> Registry {
    builder(dir, Some(hub)).hf_token(Some("secret".into())).retries(0).catalogue(cat).build().unwrap()
}

#[test]
fn the_token_never_reaches_another_host_through_url_tricks() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, other) = (Server::start(), Server::start());
    let body = payload(1000, 20);
    other.add("/x", body.clone(), Fault::None);
    other.add("/@127.0.0.1:1/x", body.clone(), Fault::None);
    hub.add("/x", body.clone(), Fault::None);
    let h = sha(&body);
    // In a catalogue: the backslash trick and userinfo are refused at load.
    for (name, url) in [
        ("backslash", format!("http://127.0.0.1:{}\\@127.0.0.1:{}/x", other.port, hub.port)),
        ("userinfo", format!("http://user@127.0.0.1:{}/x", hub.port)),
    ] {
        let cat = write_catalogue(
            dir.path(),
            &format!("{name}.json"),
            &json!({"e": entry("lora", "e/x.bin", Some(&h), &url)}),
        );
        match builder(dir.path(), Some(&hub)).hf_token(Some("secret".into())).catalogue(cat).build() {
            Err(Error::InvalidEntry { key, reason }) => assert_eq!(key, "e", "{name}: {reason}"),
            other => panic!("{name}: expected an invalid entry, got {other:?}"),
        }
    }
    // In a redirect from the hub's host: refused, nothing sent to the other host.
    for (i, location) in [
        format!("http://127.0.0.1:{}\\@127.0.0.1:{}/x", other.port, hub.port),
        format!("http://127.0.0.1:{}\\@127.0.0.1:1/x", other.port),
        format!("http://user@127.0.0.1:{}/x", other.port),
    ]
    .into_iter()
    .enumerate()
    {
        let route = format!("/redirect{i}");
        hub.add(&route, Vec::new(), Fault::Redirect(location.clone()));
        let cat = write_catalogue(
            dir.path(),
            &format!("r{i}.json"),
            &json!({"r": entry("lora", &format!("r{i}/x.bin"), Some(&h), &hub.url(&route))}),
        );
        let reg = with_token(dir.path(), &hub, cat);
        let err = reg.download("r").unwrap_err();
        assert!(matches!(err, Error::Download { .. }), "{location}: {err:?}");
        assert!(!dir.path().join(format!("cache/lora/r{i}/x.bin")).exists());
    }
    assert!(
        other.seen().iter().all(|s| s.authorization.is_none()),
        "the token reached another host: {:?}",
        other.seen()
    );
    assert!(other.seen().is_empty(), "refused redirects are not followed: {:?}", other.seen());
}

#[test]
fn the_token_is_not_sent_in_clear_to_an_https_endpoint_host() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(1000, 21);
    server.add("/x", body.clone(), Fault::None);
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({"m": entry("lora", "m/x.bin", Some(&sha(&body)), &server.url("/x"))}),
    );
    // The endpoint is https on this host and port; the file is plain http there.
    let reg = builder(dir.path(), None)
        .hf_endpoint(format!("https://127.0.0.1:{}", server.port))
        .hf_token(Some("secret".into()))
        .catalogue(cat)
        .build()
        .unwrap();
    reg.download("m").unwrap();
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authorization, None, "the token went over plain http");
}

#[test]
fn a_revision_that_is_an_absolute_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    for (i, rev) in [victim.display().to_string(), "a/../../../x".into(), "a//b".into(), "v1.lock".into()]
        .into_iter()
        .enumerate()
    {
        let cat = write_catalogue(
            dir.path(),
            &format!("c{i}.json"),
            &json!({"e": entry("lora", "e/w.pt", Some(&sha(b"x")), &format!("hf://o/r/w.pt@{rev}"))}),
        );
        match builder(dir.path(), None).catalogue(cat).build() {
            Err(Error::InvalidEntry { key, reason }) => {
                assert_eq!(key, "e", "{rev}: {reason}");
                assert!(reason.contains(&format!("c{i}.json")), "the catalogue file is named: {reason}");
            }
            other => panic!("{rev}: expected an invalid entry, got {other:?}"),
        }
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert!(!dir.path().join("hf").exists(), "nothing written");
}

/// Downloads with one retry-less attempt that is cut after `cut` bytes,
/// leaving a partial file; returns the partial file's path.
fn interrupted(dir: &Path, server: &Server, route: &str, body: &[u8], expected: &str, cut: usize) -> PathBuf {
    server.add(route, body.to_vec(), Fault::CutAfter { bytes: cut, times: 1 });
    let cat = write_catalogue(
        dir,
        "c.json",
        &json!({"m": entry("lora", "m/w.bin", Some(expected), &server.url(route))}),
    );
    let reg = builder(dir, Some(server)).retries(0).catalogue(cat).build().unwrap();
    assert!(matches!(reg.download("m"), Err(Error::Download { .. })));
    let partial = dir.join("cache/lora/m/w.bin.incomplete");
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), cut as u64);
    partial
}

#[test]
fn a_partial_file_of_another_url_or_version_is_not_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let (old, new) = (payload(200_000, 22), payload(200_000, 23));
    // The catalogue entry changes URL and hash between the two downloads.
    interrupted(dir.path(), &server, "/v1/w.bin", &old, &sha(&old), 100_000);
    server.add("/v2/w.bin", new.clone(), Fault::None);
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({"m": entry("lora", "m/w.bin", Some(&sha(&new)), &server.url("/v2/w.bin"))}),
    );
    let reg = builder(dir.path(), Some(&server)).retries(0).catalogue(cat).build().unwrap();
    let path = reg.download("m").unwrap().remove(0);
    assert_eq!(std::fs::read(&path).unwrap(), new, "the new file is whole and correct");
    let v2: Vec<_> = server.seen().into_iter().filter(|s| s.path == "/v2/w.bin").collect();
    assert_eq!(v2.len(), 1);
    assert_eq!(v2[0].range, None, "no resume from another URL's bytes");
    assert!(!leftovers(&dir.path().join("cache"))
        .iter()
        .any(|p| p.to_string_lossy().contains(".incomplete")));
}

#[test]
fn a_resume_that_mismatches_starts_again_and_sends_if_range() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let (old, new) = (payload(200_000, 24), payload(200_000, 25));
    // Same URL and catalogue hash; the server's file changes in between.
    let route = "/w.bin";
    server.add_with_headers(route, old.clone(), Fault::CutAfter { bytes: 100_000, times: 1 }, vec![]);
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({"m": entry("lora", "m/w.bin", Some(&sha(&new)), &server.url(route))}),
    );
    let reg = builder(dir.path(), Some(&server)).retries(0).catalogue(cat).build().unwrap();
    assert!(matches!(reg.download("m"), Err(Error::Download { .. })));
    server.add(route, new.clone(), Fault::None);
    let path = reg.download("m").unwrap().remove(0);
    assert_eq!(std::fs::read(&path).unwrap(), new);
    let ranges: Vec<_> = server.seen().into_iter().map(|s| s.range).collect();
    assert_eq!(ranges, [None, Some("bytes=100000-".to_string()), None], "resumed, mismatched, started again");

    // With an ETag, the resume carries If-Range; a changed file comes whole.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let etag = |v: &str| vec![("ETag".to_string(), format!("\"{v}\""))];
    server.add_with_headers(route, old.clone(), Fault::CutAfter { bytes: 100_000, times: 1 }, etag("v1"));
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({"m": entry("lora", "m/w.bin", Some(&sha(&new)), &server.url(route))}),
    );
    let reg = builder(dir.path(), Some(&server)).retries(0).catalogue(cat).build().unwrap();
    assert!(reg.download("m").is_err());
    server.add_with_headers(route, new.clone(), Fault::None, etag("v2"));
    let path = reg.download("m").unwrap().remove(0);
    assert_eq!(std::fs::read(&path).unwrap(), new);
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].range.as_deref(), Some("bytes=100000-"));
    assert_eq!(seen[1].if_range.as_deref(), Some("\"v1\""));
}

#[test]
fn a_206_to_a_request_without_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(100_000, 26);
    let (reg, _) = one_model(dir.path(), &server, "part", &body, Fault::Unasked206(40_000));
    match reg.download("part") {
        Err(Error::Download { reason, .. }) => assert!(reason.contains("206"), "{reason}"),
        other => panic!("expected a refused 206, got {other:?}"),
    }
    let left = leftovers(&dir.path().join("cache"));
    assert!(!left.iter().any(|p| !p.to_string_lossy().contains("/.locks/")), "{left:?}");
}

#[test]
fn a_huge_content_length_on_a_206_is_too_large_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(200_000, 27);
    let route = "/w.bin";
    interrupted(dir.path(), &server, route, &body, &sha(&body), 100_000);
    server.add(route, body.clone(), Fault::ClaimsLength(u64::MAX));
    let cat = dir.path().join("c.json");
    let reg = builder(dir.path(), Some(&server)).retries(0).catalogue(cat).build().unwrap();
    match reg.download("m") {
        Err(Error::DownloadTooLarge { .. }) => {}
        other => panic!("expected DownloadTooLarge, got {other:?}"),
    }
    assert_eq!(server.seen().last().unwrap().range.as_deref(), Some("bytes=100000-"));
}

#[test]
fn a_404_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let (reg, _) = one_model(dir.path(), &server, "gone", b"x", Fault::Always(404));
    assert!(reg.download("gone").is_err());
    let left = leftovers(&dir.path().join("cache"));
    assert!(!left.iter().any(|p| !p.to_string_lossy().contains("/.locks/")), "{left:?}");
}

#[test]
fn file_sources_must_be_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for (i, src) in
        [fifo.clone(), PathBuf::from("/dev/zero"), dir.path().to_path_buf()].into_iter().enumerate()
    {
        let cat = write_catalogue(
            dir.path(),
            &format!("c{i}.json"),
            &json!({"m": entry("lora", "m/w.bin", Some(&sha(b"x")), &format!("file://{}", src.display()))}),
        );
        let reg = builder(dir.path(), None).max_download_size(1 << 20).catalogue(cat).build().unwrap();
        // In a thread: opening a FIFO without O_NONBLOCK would wait forever.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(reg.download("m").map_err(|e| e.to_string()));
        });
        match rx.recv_timeout(Duration::from_secs(10)).expect("the download of a FIFO or device returns") {
            Err(reason) => assert!(reason.contains("not a regular file"), "{}: {reason}", src.display()),
            Ok(p) => panic!("{}: copied into {p:?}", src.display()),
        }
        assert!(!dir.path().join("cache/lora/m/w.bin").exists());
    }
}

#[test]
fn one_bad_file_does_not_fail_the_listing() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.bin");
    std::fs::write(&good, b"good").unwrap();
    let url = format!("file://{}", good.display());
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({
            "good": entry("lora", "good/w.bin", Some(&sha(b"good")), &url),
            "link": entry("lora", "link/w.bin", Some(&sha(b"good")), &url),
            "zip": entry("lora", "zip/w.pt", Some(&sha(b"PK\x03\x04 not a zip")), &url),
        }),
    );
    let reg = builder(dir.path(), None).catalogue(cat).build().unwrap();
    reg.download("good").unwrap();
    // A symlink out of the cache, and a malformed zip archive.
    std::fs::create_dir_all(dir.path().join("cache/lora")).unwrap();
    std::os::unix::fs::symlink(dir.path(), dir.path().join("cache/lora/link")).unwrap();
    std::fs::create_dir_all(dir.path().join("cache/lora/zip")).unwrap();
    std::fs::write(dir.path().join("cache/lora/zip/w.pt"), b"PK\x03\x04 not a zip").unwrap();
    let listed = reg.list(&Filter::new()).unwrap();
    let state = |k: &str| {
        let l = listed.iter().find(|l| l.entry.key == k).unwrap();
        (l.available, l.status[0].state, l.status[0].error.clone())
    };
    assert_eq!(state("good"), (true, FileState::Valid, None));
    let (available, s, error) = state("link");
    assert_eq!((available, s), (false, FileState::Error), "{error:?}");
    let (available, s, error) = state("zip");
    assert_eq!((available, s), (false, FileState::Error), "{error:?}");
    assert!(error.unwrap().contains("zip"));
    assert_eq!(reg.validate("zip").unwrap().files[0].state, FileState::Error);
    assert!(reg.path("zip").is_err());
}

#[test]
fn a_held_lock_times_out_naming_the_lock_file_and_a_deadline_ends_a_slow_download() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start();
    let body = payload(10_000, 28);
    server.add("/w.bin", body.clone(), Fault::None);
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({"m": entry("lora", "m/w.bin", Some(&sha(&body)), &server.url("/w.bin"))}),
    );
    let lock = dir.path().join("cache/.locks/lora/m/w.bin.lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    // Someone else holds the lock (flock locks belong to an open file, so
    // a second open in this process conflicts as another process's would).
    let holder = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: `holder` is an open descriptor.
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    let reg = builder(dir.path(), Some(&server))
        .lock_timeout(Duration::from_millis(300))
        .catalogue(cat.clone())
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let result = reg.download("m");
    drop(holder);
    match result {
        Err(Error::LockTimeout { path, .. }) => assert_eq!(path, lock),
        other => panic!("expected a lock timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(server.gets("/w.bin"), 0);

    server.add("/w.bin", body.clone(), Fault::Slow { chunk: 1000, delay: Duration::from_millis(200) });
    let reg = builder(dir.path(), Some(&server))
        .download_deadline(Some(Duration::from_millis(500)))
        .catalogue(cat)
        .build()
        .unwrap();
    match reg.download("m") {
        Err(Error::Download { reason, .. }) => assert!(reason.contains("deadline"), "{reason}"),
        other => panic!("expected a deadline, got {other:?}"),
    }
}

#[test]
fn remove_checks_the_hub_snapshot_path_and_keeps_what_is_outside() {
    let dir = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({"m": entry("lora", "m/w.pt", Some(&sha(b"x")), &format!("hf://o/r/w.pt@{commit}"))}),
    );
    // snapshots/<commit> is a symlink to a folder outside the cache.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("target"), b"precious").unwrap();
    std::os::unix::fs::symlink("target", outside.join("w.pt")).unwrap();
    let snapshots = dir.path().join("hf/models--o--r/snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    std::os::unix::fs::symlink(&outside, snapshots.join(commit)).unwrap();
    let reg = builder(dir.path(), None).catalogue(cat).build().unwrap();
    assert!(matches!(reg.remove("m"), Err(Error::UnsafePath { .. })), "{:?}", reg.remove("m"));
    assert!(std::fs::symlink_metadata(outside.join("w.pt")).is_ok(), "nothing removed through the link");
    assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"precious");
}

#[test]
fn protocol_0_pickles_and_code_less_archives_are_refused_as_pickles() {
    let dir = tempfile::tempdir().unwrap();
    let p0 = dir.path().join("p0.bin");
    std::fs::write(&p0, b"cos\nsystem\n(S'echo hi'\ntR.").unwrap();
    let fake = dir.path().join("fake.pt");
    {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::fs::File::create(&fake).unwrap());
        w.add_directory("archive/code/", zip::write::FileOptions::default()).unwrap();
        w.start_file("archive/data.pkl", zip::write::FileOptions::default()).unwrap();
        w.write_all(b"\x80\x02cos\nsystem\n.").unwrap();
        w.finish().unwrap();
    }
    let url = |p: &Path| format!("file://{}", p.display());
    let cat = write_catalogue(
        dir.path(),
        "c.json",
        &json!({
            "p0": entry("lora", "p0/w.bin", Some(&sha(&std::fs::read(&p0).unwrap())), &url(&p0)),
            "fake": entry("torchscript", "fake/m.pt", Some(&sha(&std::fs::read(&fake).unwrap())), &url(&fake)),
        }),
    );
    let reg = builder(dir.path(), None).catalogue(cat).build().unwrap();
    for key in ["p0", "fake"] {
        assert!(matches!(reg.download(key), Err(Error::Pickle { .. })), "{key}: {:?}", reg.download(key));
        assert_eq!(reg.validate(key).unwrap().files[0].state, FileState::Pickle, "{key}");
    }
}

#[test]
fn the_hub_commit_must_be_a_lowercase_sha_and_match_a_commit_revision() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Server::start();
    let body = payload(2000, 29);
    let h = sha(&body);
    let (a, b) = ("a".repeat(40), "b".repeat(40));
    let registry = |name: &str, url: &str| {
        let cat = write_catalogue(dir.path(), name, &json!({"m": entry("lora", "m/w.pt", Some(&h), url)}));
        builder(dir.path(), Some(&hub)).retries(0).catalogue(cat).build().unwrap()
    };
    // Asked for commit a, the hub says b.
    hub.add_hub_file("o/r", &a, &b, "w.pt", body.clone(), &h);
    let reg = registry("c1.json", &format!("hf://o/r/w.pt@{a}"));
    match reg.download("m") {
        Err(Error::InvalidEntry { reason, .. }) => assert!(reason.contains("asked for commit"), "{reason}"),
        other => panic!("expected a refused commit, got {other:?}"),
    }
    // A commit that is not 40 lowercase hex digits.
    for bad in ["ABCDEF".repeat(7)[..40].to_string(), "main".to_string(), "0123abc".to_string()] {
        hub.add_hub_file("o/q", "main", &bad, "w.pt", body.clone(), &h);
        let reg = registry("c2.json", "hf://o/q/w.pt@main");
        match reg.download("m") {
            Err(Error::InvalidEntry { reason, .. }) => {
                assert!(reason.contains("40 lowercase hex"), "{reason}")
            }
            other => panic!("{bad}: expected a refused commit, got {other:?}"),
        }
    }
    // An uppercase commit revision is the lowercase commit.
    let c = "c".repeat(40);
    hub.add_hub_file("o/p", "main", &c, "w.pt", body.clone(), &h);
    let reg = registry("c3.json", &format!("hf://o/p/w.pt@{}", c.to_uppercase()));
    let path = reg.download("m").unwrap().remove(0);
    assert_eq!(path, dir.path().join(format!("hf/models--o--p/snapshots/{c}/w.pt")));
    assert!(!dir.path().join("hf/models--o--p/refs").exists());
}
