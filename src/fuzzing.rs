//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, not part
//! of the API): each feeds raw bytes to one of sire's parsers.
//!
//! Every function takes any bytes and returns the parser's verdict; none may
//! panic, hang or allocate more than its input justifies, whatever the
//! bytes. A panic here is a bug in sire (the fuzzer reports it as a crash),
//! and so is a broken invariant, which is checked with `assert!`. Inputs
//! that parsers read from a file are written to a scratch file first (under
//! the system's temporary folder, removed again before returning).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::SafeTensors;

use crate::tier::{budget, spill};
use crate::{Error, Lora, Result, TensorSet};

/// Parses `data` as a budget string (`8GiB`, `50%`, `0.8`...) against no
/// total and several totals; returns the bytes of the last total's budget.
/// Asserts that a budget never exceeds a total it is a fraction of.
pub fn budget(data: &[u8]) -> Result<u64> {
    let text = utf8(data)?;
    let mut last = budget::parse_budget("fuzz", text, None);
    for total in [0, 1, 1000, 16 << 30, u64::MAX] {
        last = budget::parse_budget("fuzz", text, Some(total));
        if let Ok(bytes) = last {
            let relative = text.trim().ends_with('%') || budget::parse_budget("fuzz", text, None).is_err();
            assert!(!relative || bytes <= total, "{text:?} of {total} is {bytes} bytes");
            assert!(bytes > 0, "{text:?} is a budget of 0 bytes");
        }
    }
    last
}

/// Reads `data` as a file of the disk tier: copied and mapped as any
/// safetensors file (checksums optional, then required), and as the spill
/// file of model 1 of instance `fuzz` written with nonce 0. Returns the
/// number of tensors of the last read that succeeded.
pub fn spill(data: &[u8]) -> Result<usize> {
    let scratch = Scratch::new()?;
    let path = scratch.file("spill.safetensors", data)?;
    let names = tensor_names(data);
    let mut last = Err(Error::Io(io::Error::other("no read")));
    for require_checksum in [false, true] {
        last = spill::read(&path, &names, require_checksum).map(|t| t.len()).or(last);
    }
    last = spill::map(&path, &names, false).map(|t| t.map_or(0, |t| t.len())).or(last);
    spill::read_as_spill(&path, &names, "fuzz", 1, 0).map(|t| t.len()).or(last)
}

/// Opens `data` as a model's safetensors file ([`TensorSet::from_safetensors`])
/// and reads its tensors; returns their number.
pub fn safetensors(data: &[u8]) -> Result<usize> {
    let scratch = Scratch::new()?;
    let set = TensorSet::from_safetensors(scratch.file("model.safetensors", data)?)?;
    set.load()?;
    for name in set.names() {
        assert!(set.get(name).is_some(), "tensor `{name}` is listed but not loaded");
    }
    Ok(set.len())
}

/// Reads `data` as a LoRA safetensors file ([`Lora::from_safetensors`]) and
/// maps it onto a model whose weights are named after its modules
/// ([`Lora::to_commit`]); returns the number of modules.
pub fn lora(data: &[u8]) -> Result<usize> {
    let scratch = Scratch::new()?;
    let lora = Lora::from_safetensors(scratch.file("lora.safetensors", data)?)?;
    let names: Vec<String> = lora.modules().map(|m| format!("{m}.weight")).collect();
    let _commit = lora.to_commit(&names, 1.0)?;
    Ok(lora.len())
}

/// Reads `data` as the `adapter_config.json` of a PEFT adapter folder
/// ([`Lora::from_peft`]) whose `adapter_model.safetensors` holds rank-2
/// factors of `layers.0.q_proj` and `layers.0.v_proj` and a `classifier`
/// head; returns the number of modules.
pub fn peft_config(data: &[u8]) -> Result<usize> {
    let scratch = Scratch::new()?;
    scratch.file("adapter_config.json", data)?;
    scratch.file("adapter_model.safetensors", &peft_model())?;
    Ok(Lora::from_peft(&scratch.0)?.len())
}

/// Parses `data` as a registry catalogue (JSON); returns the number of entries.
#[cfg(feature = "registry")]
pub fn catalogue(data: &[u8]) -> Result<usize> {
    let text = utf8(data)?;
    let entries = crate::registry::catalogue::parse(text, Path::new("fuzz.json"))?;
    for e in &entries {
        for f in &e.files {
            assert!(crate::registry::catalogue::check_relative(&e.key, &f.path).is_ok(), "{:?}", f.path);
        }
    }
    Ok(entries.len())
}

/// A spill file that [`spill`] reads in full: `tensors` written as model 1
/// of instance `fuzz` with nonce 0 (for the seed corpus).
pub fn spill_seed(tensors: &[(String, tch::Tensor)]) -> Result<Vec<u8>> {
    let scratch = Scratch::new()?;
    let path = scratch.0.join("seed.safetensors");
    spill::write_as_spill(&path, tensors, "fuzz", 1, 0)?;
    Ok(fs::read(&path)?)
}

/// `data` as UTF-8, or an invalid-data error.
fn utf8(data: &[u8]) -> Result<&str> {
    std::str::from_utf8(data).map_err(|e| Error::Io(io::Error::new(io::ErrorKind::InvalidData, e)))
}

/// The tensor names a safetensors header declares (one made-up name if it
/// cannot be parsed, so that the reader still runs).
fn tensor_names(data: &[u8]) -> Vec<String> {
    match SafeTensors::read_metadata(data) {
        Ok((_, meta)) => meta.tensors().into_keys().collect(),
        Err(_) => vec!["weight".into()],
    }
}

/// The fixed `adapter_model.safetensors` of [`peft_config`].
fn peft_model() -> Vec<u8> {
    use safetensors::{tensor::TensorView, Dtype};
    let zeros = [0u8; 4 * 8 * 2];
    let view = |shape: Vec<usize>| {
        let len = shape.iter().product::<usize>() * 4;
        TensorView::new(Dtype::F32, shape, &zeros[..len]).expect("a consistent view")
    };
    let tensors = [
        ("base_model.model.layers.0.q_proj.lora_A.weight", view(vec![2, 8])),
        ("base_model.model.layers.0.q_proj.lora_B.weight", view(vec![8, 2])),
        ("base_model.model.layers.0.v_proj.lora_A.weight", view(vec![2, 8])),
        ("base_model.model.layers.0.v_proj.lora_B.weight", view(vec![8, 2])),
        ("base_model.model.classifier.modules_to_save.default.weight", view(vec![2, 8])),
    ];
    safetensors::serialize(tensors, None).expect("serializable tensors")
}

/// A scratch folder for one input's files, removed with them on drop.
struct Scratch(PathBuf);

impl Scratch {
    /// A new, empty folder under the system's temporary folder.
    fn new() -> Result<Scratch> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sire-fuzz-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }

    /// Writes `data` to the file `name` in the folder; returns its path.
    fn file(&self, name: &str, data: &[u8]) -> Result<PathBuf> {
        let path = self.0.join(name);
        fs::write(&path, data)?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
