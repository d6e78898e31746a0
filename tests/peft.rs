//! Adapters as users bring them: PEFT folders and a kohya file written by PEFT
//! and PyTorch themselves (`tests/data/make_peft_fixtures.py`), committed onto
//! managed base weights and compared with PEFT's own merged weights and outputs.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sire::{auto_manage, Error, Lora, TensorSet};
use tch::{Device, Kind, Tensor};

const F32: (Kind, Device) = (Kind::Float, Device::Cpu);
/// What PEFT's merge and sire's may differ by (f32, different summation order).
const TOLERANCE: f64 = 1e-5;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/peft")
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap()
}

fn get(tensors: &[(String, Tensor)], name: &str) -> Tensor {
    tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no `{name}`")).1.shallow_clone()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// A model's forward, given its weights by name.
type Forward = fn(&dyn Fn(&str) -> Tensor, &Tensor) -> Tensor;
/// An edit of an `adapter_config.json`.
type Edit = fn(&mut serde_json::Value);

/// `x·Wᵀ + b` (nn.Linear) or, with `conv1d`, `x·W + b` (GPT-2's Conv1D).
fn layer(w: &impl Fn(&str) -> Tensor, name: &str, x: &Tensor, conv1d: bool) -> Tensor {
    let weight = w(&format!("{name}.weight"));
    let weight = if conv1d { weight } else { weight.tr() };
    x.matmul(&weight) + w(&format!("{name}.bias"))
}

/// `Tiny` of the fixture script.
fn tiny(w: impl Fn(&str) -> Tensor, x: &Tensor) -> Tensor {
    let mut h = x.shallow_clone();
    for l in 0..2 {
        let p = |m: &str| format!("layers.{l}.{m}");
        h = &h + layer(&w, &p("v_proj"), &layer(&w, &p("q_proj"), &h, false).tanh(), false);
        h = &h + layer(&w, &p("fc2"), &layer(&w, &p("fc1"), &h, false).relu(), false);
    }
    layer(&w, "classifier", &h, false)
}

/// `Gpt` of the fixture script.
fn gpt(w: impl Fn(&str) -> Tensor, x: &Tensor) -> Tensor {
    let mut h = x.shallow_clone();
    for l in 0..2 {
        let p = |m: &str| format!("h.{l}.{m}");
        h = &h + layer(&w, &p("c_proj"), &layer(&w, &p("c_attn"), &h, true).tanh(), true);
    }
    h
}

/// Commits the adapter folder `name` onto its base weights, managed, and
/// compares every weight with PEFT's merged ones and the output with PEFT's.
/// Returns (max weight diff, output diff).
fn check_adapter(name: &str, base: &Path, forward: Forward) -> (f64, f64) {
    let dir = data().join(name);
    let (pools, _spill) = pools(64 * MIB);
    let m = pools.manage(TensorSet::from_safetensors(base).unwrap()).unwrap();
    let lora = Lora::from_peft(&dir).unwrap();
    m.commit(lora.to_commit(m.tensor_names(), 1.0).unwrap()).unwrap();
    let merged = read(&dir.join("merged.safetensors"));
    let io = read(&dir.join("io.safetensors"));
    let g = auto_manage(&m).unwrap();
    assert_eq!(g.len(), merged.len());
    let mut worst = (0.0f64, String::new());
    for (n, want) in &merged {
        let d = max_diff(&g.get(n).unwrap(), want);
        if d > worst.0 {
            worst = (d, n.clone());
        }
    }
    let w = |n: &str| g.get(n).unwrap();
    let y = forward(&w, &get(&io, "x"));
    let out = max_diff(&y, &get(&io, "y"));
    eprintln!(
        "{name}: max |weight - PEFT merged| = {:.3e} (`{}`), max |output - PEFT| = {out:.3e}",
        worst.0, worst.1
    );
    assert!(worst.0 <= TOLERANCE, "{name}: `{}` differs from PEFT's merge by {}", worst.1, worst.0);
    assert!(out <= TOLERANCE, "{name}: output differs from PEFT's by {out}");
    // The adapter changed something: the base is not already the merge.
    let base = read(base);
    let changed = base.iter().filter(|(n, t)| max_diff(t, &get(&merged, n)) > 1e-3).count();
    assert!(changed > 0, "{name}: the fixture changes nothing");
    (worst.0, out)
}

fn tiny_forward(w: &dyn Fn(&str) -> Tensor, x: &Tensor) -> Tensor {
    tiny(w, x)
}

fn gpt_forward(w: &dyn Fn(&str) -> Tensor, x: &Tensor) -> Tensor {
    gpt(w, x)
}

#[test]
fn rank_and_alpha_patterns_match_peft() {
    let lora = Lora::from_peft(data().join("patterns")).unwrap();
    assert_eq!(lora.len(), 8);
    check_adapter("patterns", &data().join("base.safetensors"), tiny_forward);
}

#[test]
fn rslora_matches_peft() {
    check_adapter("rslora", &data().join("base.safetensors"), tiny_forward);
}

#[test]
fn fan_in_fan_out_conv1d_matches_peft() {
    check_adapter("fan_in_fan_out", &data().join("fan_in_fan_out/base.safetensors"), gpt_forward);
}

#[test]
fn modules_to_save_replace_the_head_exactly() {
    let dir = data().join("modules_to_save");
    let lora = Lora::from_peft(&dir).unwrap();
    assert_eq!(lora.replacements().collect::<Vec<_>>(), ["classifier.bias", "classifier.weight"]);
    assert_eq!(lora.len(), 4);
    check_adapter("modules_to_save", &data().join("base.safetensors"), tiny_forward);

    // The head is the adapter's, bit for bit; reverting brings the base back.
    let (pools, _spill) = pools(64 * MIB);
    let base = TensorSet::from_safetensors(data().join("base.safetensors")).unwrap();
    let before = snapshot(&base);
    let m = pools.manage(base).unwrap();
    let id = m.commit(lora.to_commit(m.tensor_names(), 1.0).unwrap()).unwrap();
    let saved = read(&dir.join("adapter_model.safetensors"));
    {
        let g = auto_manage(&m).unwrap();
        for p in ["weight", "bias"] {
            let want = get(&saved, &format!("base_model.model.classifier.{p}"));
            assert_eq!(
                bytes_of(&g.get(&format!("classifier.{p}")).unwrap()),
                bytes_of(&want),
                "classifier.{p}"
            );
        }
    }
    assert_eq!(m.revert().unwrap(), id);
    let g = auto_manage(&m).unwrap();
    for (n, b) in &before {
        assert_eq!(&bytes_of(&g.get(n).unwrap()), b, "`{n}` after revert");
    }
}

#[test]
fn kohya_names_map_onto_dotted_names() {
    let dir = data().join("kohya");
    let lora = Lora::from_safetensors(dir.join("lora.safetensors")).unwrap();
    let merged = read(&dir.join("merged.safetensors"));
    for prefix in ["", "unet."] {
        let base = read(&dir.join("base.safetensors"));
        let (pools, _spill) = pools(64 * MIB);
        let set = TensorSet::new(base.into_iter().map(|(n, t)| (format!("{prefix}{n}"), t))).unwrap();
        let m = pools.manage(set).unwrap();
        let commit = lora.to_commit(m.tensor_names(), 0.75).unwrap();
        let mut targets: Vec<&str> = commit.targets().collect();
        targets.sort();
        let want: Vec<String> = [
            "down_blocks.0.attentions.0.proj_in.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
            "down_blocks.0.resnets.0.conv1.weight",
            "mid_block.attentions.0.proj_out.weight",
        ]
        .iter()
        .map(|n| format!("{prefix}{n}"))
        .collect();
        assert_eq!(targets, want);
        m.commit(commit).unwrap();
        let g = auto_manage(&m).unwrap();
        let worst = merged
            .iter()
            .map(|(n, t)| max_diff(&g.get(&format!("{prefix}{n}")).unwrap(), t))
            .fold(0.0, f64::max);
        eprintln!("kohya (prefix `{prefix}`): max |weight - Python merge| = {worst:.3e}");
        assert!(worst <= TOLERANCE, "{worst}");
    }
}

#[test]
fn kohya_ambiguity_lists_the_candidates() {
    let a = Tensor::zeros([2, 4], F32);
    let b = Tensor::zeros([4, 2], F32);
    let lora = Lora::from_tensors([
        ("lora_unet_blocks_0_to_q.lora_down.weight", a),
        ("lora_unet_blocks_0_to_q.lora_up.weight", b),
    ])
    .unwrap();
    // `blocks_0.to_q` and `blocks.0.to.q` are both `blocks_0_to_q` with `_` for `.`.
    match lora.to_commit(["blocks_0.to_q.weight", "blocks.0.to.q.weight", "blocks.0.to_k.weight"], 1.0) {
        Err(Error::AmbiguousKey { key, candidates }) => {
            assert_eq!(key, "lora_unet_blocks_0_to_q");
            assert_eq!(candidates, ["blocks_0.to_q.weight", "blocks.0.to.q.weight"]);
        }
        other => panic!("expected AmbiguousKey, got {other:?}"),
    }
    match lora.to_commit(["blocks.0.to_k.weight"], 1.0) {
        Err(e @ Error::UnmatchedKey { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("`lora_unet_blocks_0_to_q`") && msg.contains("`blocks_0_to_q`"), "{msg}");
        }
        other => panic!("expected UnmatchedKey, got {other:?}"),
    }
}

fn invalid(r: sire::Result<Lora>) -> (String, String) {
    match r {
        Err(Error::InvalidLora { origin, reason }) => (origin, reason),
        other => panic!("expected InvalidLora, got {other:?}"),
    }
}

#[test]
fn dora_is_refused_naming_the_key() {
    let (origin, reason) = invalid(Lora::from_peft(data().join("dora")));
    assert!(origin.ends_with("dora/adapter_model.safetensors"), "{origin}");
    assert!(reason.contains("`base_model.model.layers.0.q_proj.lora_magnitude_vector`"), "{reason}");
    assert!(reason.contains("DoRA"), "{reason}");
    // Without the magnitude tensors, the config's `use_dora` still refuses it.
    let dir = copy_fixture("patterns");
    edit_config(dir.path(), |c| c["use_dora"] = true.into());
    let (origin, reason) = invalid(Lora::from_peft(dir.path()));
    assert!(origin.ends_with("adapter_config.json"), "{origin}");
    assert_eq!(reason, "`use_dora: true` (DoRA) is not supported");
}

/// A private copy of a fixture folder.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(data().join(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

#[test]
fn non_finite_factors_are_refused() {
    let ok = || Tensor::ones([2, 4], F32);
    for (what, a, b, alpha) in [
        ("NaN", ok().fill_(f64::NAN), Tensor::ones([4, 2], F32), 1.0),
        ("infinity", ok(), Tensor::ones([4, 2], F32).fill_(f64::INFINITY), 1.0),
        ("alpha", ok(), Tensor::ones([4, 2], F32), f64::NAN),
    ] {
        let (origin, reason) = invalid(Lora::from_tensors([
            ("m.lora_down.weight", a),
            ("m.lora_up.weight", b),
            ("m.alpha", Tensor::from(alpha as f32)),
        ]));
        assert_eq!(origin, "tensors");
        assert!(reason.contains("`m"), "{what}: {reason}");
        assert!(reason.contains("NaN") || reason.contains("infinity"), "{what}: {reason}");
    }
    // From a file, and from a PEFT folder.
    let dir = copy_fixture("rslora");
    let path = dir.path().join("adapter_model.safetensors");
    let tensors = read(&path);
    let _ = tensors[3].1.get(0).get(0).fill_(f64::NEG_INFINITY);
    let bad = tensors[3].0.clone();
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, &path).unwrap();
    for r in [Lora::from_safetensors(&path), Lora::from_peft(dir.path())] {
        let (origin, reason) = invalid(r);
        assert_eq!(origin, path.display().to_string());
        assert_eq!(reason, format!("LoRA factor `{bad}` holds an infinity"));
    }
}

#[test]
fn malformed_adapter_files_name_the_file_and_the_reason() {
    let dir = copy_fixture("patterns");
    let path = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for (what, content) in [
        ("truncated", bytes[..bytes.len() - 100].to_vec()),
        ("bad header", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}".to_vec()),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&path, &content).unwrap();
        for r in [Lora::from_safetensors(&path), Lora::from_peft(dir.path())] {
            let (origin, reason) = invalid(r);
            assert_eq!(origin, path.display().to_string(), "{what}");
            assert!(reason.starts_with("not a valid safetensors file: "), "{what}: {reason}");
            assert!(!reason.contains("libtorch") && !reason.contains("frame #"), "{what}: {reason}");
            eprintln!("{what}: {reason}");
        }
    }
    std::fs::remove_file(&path).unwrap();
    let (origin, reason) = invalid(Lora::from_peft(dir.path()));
    assert_eq!(origin, path.display().to_string());
    assert!(reason.starts_with("cannot read the file: "), "{reason}");
}

#[test]
fn malformed_config_names_the_file_line_and_column() {
    let dir = copy_fixture("patterns");
    let config = dir.path().join("adapter_config.json");
    std::fs::write(&config, "{\n  \"r\": 4,\n  \"lora_alpha\": 8,,\n}\n").unwrap();
    let (origin, reason) = invalid(Lora::from_peft(dir.path()));
    assert_eq!(origin, config.display().to_string());
    assert!(reason.starts_with("malformed JSON at line 3, column "), "{reason}");
    eprintln!("{reason}");
    std::fs::remove_file(&config).unwrap();
    let (origin, reason) = invalid(Lora::from_peft(dir.path()));
    assert_eq!(origin, config.display().to_string());
    assert!(reason.starts_with("cannot read the file: "), "{reason}");
}

#[test]
fn configs_that_would_give_a_wrong_scale_are_refused() {
    let cases: [(&str, Edit, &str); 7] = [
        ("peft_type", |c| c["peft_type"] = "LOHA".into(), "`peft_type` is `LOHA`"),
        ("r", |c| c["r"] = 8.into(), "has rank 4, but the config gives it r = 8 (`r`)"),
        (
            "rank_pattern",
            |c| c["rank_pattern"]["layers.0.q_proj"] = 3.into(),
            "has rank 2, but the config gives it r = 3 (`rank_pattern[\"layers.0.q_proj\"]`)",
        ),
        ("regex", |c| c["alpha_pattern"]["^layers\\.0.*"] = 1.into(), "is a regular expression"),
        ("target_modules", |c| c["target_modules"] = serde_json::json!(["q_proj"]), "does not select it"),
        ("lora_alpha", |c| c["lora_alpha"] = "eight".into(), "`lora_alpha` is \"eight\""),
        ("bias", |c| c["bias"] = "all".into(), "`bias: \"all\"`"),
    ];
    for (what, edit, want) in cases {
        let dir = copy_fixture("patterns");
        edit_config(dir.path(), edit);
        let (_, reason) = invalid(Lora::from_peft(dir.path()));
        assert!(reason.contains(want), "{what}: {reason}");
    }
    // A tensor that is neither a factor nor under modules_to_save.
    let dir = copy_fixture("modules_to_save");
    edit_config(dir.path(), |c| c["modules_to_save"] = serde_json::Value::Null);
    let (_, reason) = invalid(Lora::from_peft(dir.path()));
    assert!(
        reason.contains("`base_model.model.classifier.bias`") && reason.contains("modules_to_save"),
        "{reason}"
    );
}

#[test]
fn pattern_keys_follow_the_file_order() {
    // PEFT takes the first matching key in the config's order: with
    // `layers.0.v_proj` written before `v_proj`, layer 0's v_proj gets alpha 2,
    // layer 1's keeps 16. Compare sire's scales through the merged weights.
    let dir = copy_fixture("patterns");
    let path = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("\"v_proj\": 16", "\"layers.0.v_proj\": 2,\n    \"v_proj\": 16");
    std::fs::write(&path, text).unwrap();
    let names: Vec<String> = read(&data().join("base.safetensors")).into_iter().map(|(n, _)| n).collect();
    let base = TensorSet::from_safetensors(data().join("base.safetensors")).unwrap();
    let (pools, _spill) = pools(64 * MIB);
    let m = pools.manage(base).unwrap();
    m.commit(Lora::from_peft(dir.path()).unwrap().to_commit(&names, 1.0).unwrap()).unwrap();
    let merged = read(&data().join("patterns/merged.safetensors"));
    let base = read(&data().join("base.safetensors"));
    let g = auto_manage(&m).unwrap();
    for (l, ratio) in [(0, 2.0 / 16.0), (1, 1.0)] {
        let n = format!("layers.{l}.v_proj.weight");
        let want = get(&base, &n) + (get(&merged, &n) - get(&base, &n)) * ratio;
        assert!(max_diff(&g.get(&n).unwrap(), &want) <= TOLERANCE, "{n}");
    }
}
