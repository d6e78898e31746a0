//! The fuzz corpus (`fuzz/corpus/<target>/`) replayed through the fuzz entry
//! points (`sire::fuzzing`) as an ordinary test: every input the fuzzer was
//! seeded with or found a crash with must run without a panic. Seeds named
//! `ok-*` must be accepted and `bad-*` refused, so that the corpus keeps
//! reaching past the first check of each parser.
//!
//! `cargo test --features fuzzing,registry --test fuzz_corpus -- --ignored`
//! rewrites the generated seeds (`write_seeds`).

use std::fs;
use std::path::{Path, PathBuf};

use sire::fuzzing;
use tch::{Kind, Tensor};

type Target = fn(&[u8]) -> sire::Result<()>;

/// Each target's name (its folder under `fuzz/corpus`) and entry point.
const TARGETS: [(&str, Target); 6] = [
    ("budget", |d| fuzzing::budget(d).map(drop)),
    ("catalogue", |d| fuzzing::catalogue(d).map(drop)),
    ("lora", |d| fuzzing::lora(d).map(drop)),
    ("peft_config", |d| fuzzing::peft_config(d).map(drop)),
    ("safetensors", |d| fuzzing::safetensors(d).map(drop)),
    ("spill", |d| fuzzing::spill(d).map(drop)),
];

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

#[test]
fn corpus_replays_without_panics() {
    for (target, run) in TARGETS {
        let mut files: Vec<PathBuf> = fs::read_dir(corpus(target))
            .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 3, "fuzz/corpus/{target} holds {} inputs", files.len());
        for file in files {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            let result = run(&fs::read(&file).unwrap());
            if name.starts_with("ok-") {
                assert!(result.is_ok(), "{target}/{name} was refused: {}", result.unwrap_err());
            }
            if name.starts_with("bad-") {
                assert!(result.is_err(), "{target}/{name} was accepted");
            }
        }
    }
}

/// A short fuzz that CI can afford (the coverage-guided targets in `fuzz/`
/// take minutes to build; `scripts/fuzz.sh` runs them): every corpus input
/// mutated `SIRE_FUZZ_MUTATIONS` times (default 300) by a seeded generator
/// (bytes flipped, set to edge values, inserted, removed; the input truncated
/// or extended; a run copied from elsewhere in it), each mutant run through its
/// target, which must return (a value or an error) without panicking. The seed
/// is printed; `SIRE_FUZZ_SEED` replays a run.
#[test]
fn mutated_corpus_runs_without_panics() {
    let rounds: usize = std::env::var("SIRE_FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let seed: u64 = std::env::var("SIRE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("mutated corpus: seed {seed} (SIRE_FUZZ_SEED={seed} replays it), {rounds} mutants per input");
    let mut rng = seed | 1;
    let mut next = move || {
        // xorshift64*: small, seeded, good enough to pick mutations.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut runs = 0usize;
    for (target, run) in TARGETS {
        let mut files: Vec<PathBuf> =
            fs::read_dir(corpus(target)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files {
            let original = fs::read(&file).unwrap();
            for round in 0..rounds {
                let mut d = original.clone();
                for _ in 0..1 + next() % 4 {
                    let at = if d.is_empty() { 0 } else { (next() % d.len() as u64) as usize };
                    match next() % 7 {
                        0 if !d.is_empty() => d[at] ^= 1 << (next() % 8),
                        1 if !d.is_empty() => {
                            d[at] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'9'][(next() % 7) as usize]
                        }
                        2 => d.insert(at.min(d.len()), next() as u8),
                        3 if !d.is_empty() => {
                            d.remove(at);
                        }
                        4 => d.truncate((next() % (d.len() as u64 + 1)) as usize),
                        5 => d.extend((0..next() % 64).map(|_| next() as u8)),
                        _ if d.len() > 1 => {
                            let from = (next() % d.len() as u64) as usize;
                            let len = (next() % 16) as usize;
                            let run: Vec<u8> = d[from..(from + len).min(d.len())].to_vec();
                            let to = (next() % d.len() as u64) as usize;
                            d.splice(to..to, run);
                        }
                        _ => {}
                    }
                }
                let name = file.file_name().unwrap().to_string_lossy().into_owned();
                let r = std::panic::catch_unwind(|| drop(run(&d)));
                assert!(
                    r.is_ok(),
                    "{target}/{name}, mutant {round} (seed {seed}) panicked; the input: {}",
                    d.iter().map(|b| format!("{b:02x}")).collect::<String>()
                );
                runs += 1;
            }
        }
    }
    println!("mutated corpus: {runs} runs, no panic");
}

/// A safetensors file: an 8-byte little-endian header length, the JSON
/// header, the data.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn copy(target: &str, name: &str, from: &str) {
    write(target, name, &fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(from)).unwrap());
}

/// Regenerates the seeds (the `ok-`/`bad-`/`edge-` files; crash inputs the
/// fuzzer found are kept as they are).
#[test]
#[ignore = "rewrites fuzz/corpus; run by hand"]
fn write_seeds() {
    let t = |shape: &[i64], kind: Kind| {
        Tensor::arange(shape.iter().product::<i64>(), (kind, tch::Device::Cpu)).reshape(shape)
    };
    // budget
    for (i, s) in ["8GiB", "50%", "0.8", "123456", "1.5GB", " 6 kb ", "12.5%", "1T"].iter().enumerate() {
        write("budget", &format!("ok-{i}"), s.as_bytes());
    }
    let bad = [
        "",
        "-1",
        "nan",
        "1e9",
        "0",
        "18446744073709551616",
        "99999999999999999999999999999999999999999",
        "1..2",
        "%",
        "101%",
        "2.5",
        "6 parsecs",
        "0.0000000000000000000001",
    ];
    for (i, s) in bad.iter().enumerate() {
        write("budget", &format!("bad-{i}"), s.as_bytes());
    }
    // catalogue
    let ok = [
        r#"{}"#,
        r#"{"resnet18": {"name": "ResNet-18", "type": "torchscript", "description": "ImageNet classifier", "license": "bsd-3-clause",
  "config": {"files": [{"path": "resnet18/model.pt", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}],
             "download": [{"file_name": "model.pt", "file_path": "resnet18", "file_url": "https://example.org/resnet18.pt"}]}}}"#,
        r#"{"a": {"type": "lora", "config": {"download": [{"file_name": "adapter_config.json", "file_path": "x", "file_url": "hf://org/repo/adapter_config.json@main"}, {"file_name": "w.safetensors", "file_url": "file:///tmp/w%20x.safetensors"}]}, "tags": ["t"], "available": true}}"#,
        r#"{"b": {"type": "Other-Kind.v2", "config": {"files": [{"path": "b/c", "sha256": "SHA256:9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"}]}}}"#,
    ];
    for (i, s) in ok.iter().enumerate() {
        write("catalogue", &format!("ok-{i}"), s.as_bytes());
    }
    let bad = [
        r#"[]"#,
        r#"{"a": {"type": "lora", "config": {"files": [{"path": "../etc/passwd"}]}}}"#,
        r#"{"a": {"type": "lora", "config": {"files": [{"path": "/abs"}]}}}"#,
        r#"{"a": {"type": "lora", "config": {"download": [{"file_name": "a/b", "file_url": "https://h/x"}]}}}"#,
        r#"{"a": {"type": "lora", "config": {"download": [{"file_name": "x", "file_url": "ftp://h/x"}]}}}"#,
        r#"{"a": {"type": "lora", "config": {"files": [{"path": "x", "sha256": "abc"}]}}}"#,
        r#"{"": {"type": "lora"}}"#,
        r#"{"a": {"type": "../x"}}"#,
        r#"{"a": {"type": "lora", "config": {"download": [{"file_name": "x", "file_url": "hf://org/repo/../x"}]}}}"#,
        r#"{"a": {"type": "lora""#,
        // `%+f` was decoded as `%0f` (u8::from_str_radix takes a sign).
        r#"{"a": {"type": "lora", "config": {"download": [{"file_name": "x", "file_url": "file:///a%+f"}]}}}"#,
    ];
    for (i, s) in bad.iter().enumerate() {
        write("catalogue", &format!("bad-{i}"), s.as_bytes());
    }
    // lora
    copy("lora", "ok-kohya", "tests/data/peft/kohya/lora.safetensors");
    copy("lora", "bad-dora", "tests/data/peft/dora/adapter_model.safetensors");
    let f32s = |n: usize| vec![0u8; 4 * n];
    write(
        "lora",
        "ok-small",
        &safetensors(
            r#"{"m.lora_A.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"m.lora_B.weight":{"dtype":"F32","shape":[2,1],"data_offsets":[8,16]},"m.alpha":{"dtype":"F32","shape":[],"data_offsets":[16,20]}}"#,
            &f32s(5),
        ),
    );
    write(
        "lora",
        "bad-nan",
        &safetensors(
            r#"{"m.lora_A.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},"m.lora_B.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[4,8]}}"#,
            &[0, 0, 0xc0, 0x7f, 0, 0, 0, 0],
        ),
    );
    write(
        "lora",
        "bad-1d",
        &safetensors(
            r#"{"m.lora_down.weight":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"m.lora_up.weight":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]}}"#,
            &f32s(2),
        ),
    );
    // peft_config: the fixed adapter holds q_proj, v_proj (r = 2) and a classifier.
    copy("peft_config", "ok-modules_to_save", "tests/data/peft/modules_to_save/adapter_config.json");
    write(
        "peft_config",
        "ok-patterns",
        br#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2, "layers.0.v_proj": 2}, "alpha_pattern": {"v.proj": 1.5}, "use_rslora": true, "fan_in_fan_out": true, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["classifier"], "use_dora": false, "layer_replication": null, "bias": "none"}"#,
    );
    copy("peft_config", "bad-dora", "tests/data/peft/dora/adapter_config.json");
    write("peft_config", "bad-type", br#"{"peft_type": "IA3", "r": 2, "lora_alpha": 4}"#);
    write("peft_config", "bad-regex", br#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "modules_to_save": ["classifier"], "rank_pattern": {"^q.*": 2}}"#);
    write("peft_config", "bad-r", br#"{"peft_type": "LORA", "r": 1.5, "lora_alpha": 4}"#);
    // safetensors and spill
    let spill = fuzzing::spill_seed(&[
        ("w".to_string(), t(&[2, 3], Kind::Float)),
        ("b".to_string(), t(&[3], Kind::Half)),
        ("i".to_string(), t(&[2], Kind::Int64)),
        ("e".to_string(), t(&[0, 4], Kind::BFloat16)),
    ])
    .unwrap();
    for target in ["safetensors", "spill"] {
        write(target, "ok-spill", &spill);
        copy(target, "ok-plain", "tests/data/ts_buffers_io.safetensors");
        write(target, "ok-empty", &safetensors("{}", &[]));
        write(
            target,
            "ok-meta",
            &safetensors(
                r#"{"__metadata__":{"format":"pt"},"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#,
                &[1, 2, 3],
            ),
        );
        write(target, "bad-short", &[1, 0, 0]);
        write(target, "bad-header-len", &[0xff; 16]);
        write(
            target,
            "bad-dtype",
            &safetensors(r#"{"x":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#, &[0, 0]),
        );
        write(
            target,
            "bad-beyond",
            &safetensors(r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 4]),
        );
        write(
            target,
            "bad-overlap",
            &safetensors(
                r#"{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"y":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}"#,
                &[0; 3],
            ),
        );
        write(
            target,
            "edge-zero-huge",
            &safetensors(
                r#"{"x":{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}}"#,
                &[],
            ),
        );
    }
    let mut forged = spill.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    write("spill", "bad-flipped", &forged);
}
