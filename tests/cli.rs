//! The `sire` command, run as a process: exit codes, messages and `--json`
//! output that scripts rely on.

#[path = "common/http.rs"]
mod http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use http::{Fault, Server};
use serde_json::{json, Value};

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox { dir: tempfile::tempdir().unwrap() }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `sire` with private caches and spill directory.
    fn sire(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_sire"))
            .args(args)
            .env("SIRE_CACHE_HOME", self.path().join("cache"))
            .env("HF_HUB_CACHE", self.path().join("hf"))
            .env("SIRE_SPILL_DIR", self.path().join("spill"))
            .env_remove("SIRE_CATALOGUE")
            .env_remove("HF_ENDPOINT")
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .expect("run sire")
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn json_out(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn catalogue_entry(path: &str, sha: &str, url: &str) -> Value {
    let (dir, name) = path.rsplit_once('/').unwrap();
    json!({
        "name": "Tiny weights",
        "type": "safetensors",
        "license": "mit",
        "config": {
            "files": [{ "path": path, "sha256": sha }],
            "download": [{ "file_name": name, "file_path": dir, "file_url": url }]
        }
    })
}

#[test]
fn devices_reports_pools_and_cuda() {
    let s = Sandbox::new();
    let o = s.sire(&["devices", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v = json_out(&o);
    let pools = v["pools"].as_array().unwrap();
    let cpu = pools.iter().find(|p| p["location"] == "cpu").expect("a cpu pool");
    assert!(cpu["budget"].as_u64().unwrap() > 0);
    let cuda_pools = pools.iter().filter(|p| p["location"].as_str().unwrap().starts_with("cuda")).count();
    assert_eq!(
        v["cuda"].as_array().unwrap().len(),
        cuda_pools,
        "one CUDA entry per CUDA pool (none without a GPU)"
    );
    let human = s.sire(&["devices"]);
    assert_eq!(code(&human), 0);
    assert!(stdout(&human).contains("cpu"), "{}", stdout(&human));
}

#[test]
fn models_commands_over_a_file_url() {
    let s = Sandbox::new();
    let weights = s.path().join("w.safetensors");
    let t = tch::Tensor::arange(16, tch::kind::FLOAT_CPU);
    tch::Tensor::write_safetensors(&[("w", &t)], &weights).unwrap();
    let bytes = std::fs::read(&weights).unwrap();
    let entry =
        catalogue_entry("tiny/w.safetensors", &sha256_hex(&bytes), &format!("file://{}", weights.display()));
    let cat = s.write("c.json", &json!({ "tiny": entry }).to_string());
    let cat = cat.to_str().unwrap();
    let expected = s.path().join("cache/safetensors/tiny/w.safetensors");

    let list = s.sire(&["-c", cat, "models", "list", "--json"]);
    assert_eq!(code(&list), 0, "{}", stderr(&list));
    let v = json_out(&list);
    assert_eq!((v[0]["key"].as_str(), v[0]["available"].as_bool()), (Some("tiny"), Some(false)));
    assert_eq!(v[0]["metadata"]["license"], "mit", "metadata is kept in the listing");

    let path = s.sire(&["-c", cat, "models", "path", "tiny"]);
    assert_eq!(code(&path), 3, "not downloaded");
    assert!(stderr(&path).starts_with("sire: error: model `tiny` is not downloaded"), "{}", stderr(&path));
    assert_eq!(code(&s.sire(&["-c", cat, "models", "validate", "tiny"])), 3);

    let dl = s.sire(&["-c", cat, "-q", "models", "download", "tiny", "--json"]);
    assert_eq!(code(&dl), 0, "{}", stderr(&dl));
    assert_eq!(json_out(&dl)[0]["paths"][0].as_str().map(PathBuf::from), Some(expected.clone()));
    assert_eq!(std::fs::read(&expected).unwrap(), bytes);

    let valid = s.sire(&["-c", cat, "models", "validate", "--all"]);
    assert_eq!((code(&valid), stdout(&valid)), (0, "tiny\tvalid\n".to_string()));
    let path = s.sire(&["-c", cat, "models", "path", "tiny"]);
    assert_eq!(stdout(&path).trim_end(), expected.to_str().unwrap());
    let only = s.sire(&["-c", cat, "models", "list", "--available", "--filter", "license=mit", "--json"]);
    assert_eq!(json_out(&only).as_array().unwrap().len(), 1);
    let none = s.sire(&["-c", cat, "models", "list", "--missing", "--json"]);
    assert_eq!(json_out(&none).as_array().unwrap().len(), 0);

    let cache = s.sire(&["-c", cat, "cache", "--json"]);
    assert_eq!(code(&cache), 0, "{}", stderr(&cache));
    assert_eq!(json_out(&cache)["sire"]["safetensors"], bytes.len() as u64);

    // Every key is tried and reported, in order; one failure exits 1.
    let rm = s.sire(&["-c", cat, "models", "remove", "nope", "tiny", "--json"]);
    assert_eq!(code(&rm), 1, "{}", stderr(&rm));
    let v = json_out(&rm);
    assert_eq!(v[0]["key"], "nope");
    assert!(v[0]["error"].as_str().unwrap().contains("nope"), "{v}");
    assert_eq!((v[1]["key"].as_str(), v[1]["freed"].as_u64()), (Some("tiny"), Some(bytes.len() as u64)));
    assert!(!expected.exists());
    let valid = s.sire(&["-c", cat, "models", "validate", "tiny", "--json"]);
    assert_eq!(code(&valid), 3);
    assert_eq!(json_out(&valid)[0]["files"][0]["state"], "missing");
}

#[test]
fn usage_errors_exit_2_with_a_message() {
    let s = Sandbox::new();
    let broken = s.write("broken.json", "{\"a\": {\"type\": \"lora\" \"x\": 1}}");
    let o = s.sire(&["-c", broken.to_str().unwrap(), "models", "list"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("broken.json") && stderr(&o).contains("line 1, column 23"), "{}", stderr(&o));

    let ok = s.write("ok.json", "{}");
    let o = s.sire(&["-c", ok.to_str().unwrap(), "models", "path", "nope"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("no model `nope`"), "{}", stderr(&o));

    let o = s.sire(&["models", "list"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("no catalogue"), "{}", stderr(&o));
    assert_eq!(code(&s.sire(&["models", "frobnicate"])), 2, "clap's usage error");
}

#[test]
fn failed_downloads_exit_1_naming_the_cause() {
    let s = Sandbox::new();
    let server = Server::start();
    server.add("/gone", Vec::new(), Fault::Always(404));
    server.add("/other", b"not the file".to_vec(), Fault::None);
    let cat = s.write(
        "c.json",
        &json!({
            "gone": catalogue_entry("g/g.bin", &sha256_hex(b"x"), &server.url("/gone")),
            "other": catalogue_entry("o/o.bin", &sha256_hex(b"x"), &server.url("/other")),
        })
        .to_string(),
    );
    let cat = cat.to_str().unwrap();
    let o = s.sire(&["-c", cat, "-q", "models", "download", "gone"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("HTTP 404"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("WARN") && stderr(&o).contains("plain http"),
        "plain http is warned about: {}",
        stderr(&o)
    );
    let o = s.sire(&["-c", cat, "-q", "models", "download", "other", "--json"]);
    assert_eq!(code(&o), 1);
    let err = json_out(&o)[0]["error"].as_str().unwrap().to_string();
    assert!(err.contains(&sha256_hex(b"x")) && err.contains(&sha256_hex(b"not the file")), "{err}");
}
