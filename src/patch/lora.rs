//! LoRA files: factors read from safetensors in the common layouts, mapped
//! onto a model's tensor names as one [`Commit`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use tch::Tensor;

use crate::{Commit, Error, Result};

/// LoRA factors for a set of modules, as stored in a LoRA file.
///
/// Two key layouts are read: PEFT's `<module>.lora_A.weight` (down, `[rank, in]`)
/// and `<module>.lora_B.weight` (up, `[out, rank]`), and kohya's
/// `<module>.lora_down.weight` / `<module>.lora_up.weight`, each with an
/// optional scalar `<module>.alpha`. A module's update is
/// `W += multiplier · alpha / rank · (up · down)`; a module without an alpha
/// uses [`Lora::alpha`] if set, else `alpha = rank` (scale 1). PEFT keeps its
/// `lora_alpha` in `adapter_config.json`: pass it with [`Lora::alpha`].
///
/// ```
/// # fn main() -> sire::Result<()> {
/// use tch::{nn, Device, Kind, Tensor};
/// let vs = nn::VarStore::new(Device::Cpu);
/// let _fc = nn::linear(vs.root() / "fc", 16, 8, Default::default());
/// let lora = sire::Lora::from_tensors([
///     ("base_model.model.fc.lora_A.weight", Tensor::randn([4, 16], (Kind::Float, Device::Cpu))),
///     ("base_model.model.fc.lora_B.weight", Tensor::zeros([8, 4], (Kind::Float, Device::Cpu))),
/// ])?
/// .alpha(8.0);
/// let commit = lora.to_commit(vs.variables().keys(), 1.0)?; // scale 1.0 · 8 / 4
/// assert_eq!(commit.targets().collect::<Vec<_>>(), ["fc.weight"]);
/// # Ok(()) }
/// ```
pub struct Lora {
    origin: String,
    modules: Vec<Module>,
    alpha: Option<f64>,
}

struct Module {
    key: String,
    down: Tensor,
    up: Tensor,
    alpha: Option<f64>,
}

/// A module's down and up factors and alpha, as read so far.
type Factors = (Option<Tensor>, Option<Tensor>, Option<f64>);

#[derive(Clone, Copy)]
enum Role {
    Down,
    Up,
    Alpha,
}

const SUFFIXES: [(&str, Role); 5] = [
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

/// Prefixes that wrappers put in front of the model's own names.
const WRAPPERS: [&str; 2] = ["base_model.model.", "base_model."];

/// Prefixes of kohya-style keys (`lora_unet_down_blocks_0_...`).
const KOHYA: [&str; 6] = ["lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lora_transformer_", "lora_"];

impl Lora {
    /// Reads the factors of a LoRA safetensors file (onto the CPU).
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Lora> {
        let path = path.as_ref();
        let tensors = Tensor::read_safetensors(path)?;
        Lora::parse(path.display().to_string(), tensors)
    }

    /// Builds a `Lora` from named tensors laid out as in a LoRA file.
    pub fn from_tensors<S: Into<String>>(tensors: impl IntoIterator<Item = (S, Tensor)>) -> Result<Lora> {
        Lora::parse("tensors".into(), tensors.into_iter().map(|(n, t)| (n.into(), t)).collect())
    }

    fn parse(origin: String, tensors: Vec<(String, Tensor)>) -> Result<Lora> {
        let invalid = |reason: String| Error::InvalidLora { origin: origin.clone(), reason };
        let mut parts: BTreeMap<String, Factors> = BTreeMap::new();
        for (name, t) in tensors {
            let Some((module, role)) = SUFFIXES
                .iter()
                .find_map(|(sfx, role)| name.strip_suffix(sfx).map(|m| (m.to_string(), *role)))
            else {
                return Err(invalid(format!(
                    "key `{name}` is not a LoRA factor (expected `<module>.lora_A.weight`, `.lora_B.weight`, \
                     `.lora_down.weight`, `.lora_up.weight` or `.alpha`)"
                )));
            };
            let entry = parts.entry(module).or_default();
            let duplicate = match role {
                Role::Down => entry.0.replace(t).is_some(),
                Role::Up => entry.1.replace(t).is_some(),
                Role::Alpha => {
                    if t.numel() != 1 {
                        return Err(invalid(format!(
                            "`{name}` has shape {:?}; an alpha is a scalar",
                            t.size()
                        )));
                    }
                    let v = t.reshape([-1]).double_value(&[0]);
                    entry.2.replace(v).is_some()
                }
            };
            if duplicate {
                return Err(invalid(format!("`{name}` is given twice (in two layouts)")));
            }
        }
        let mut modules = Vec::with_capacity(parts.len());
        for (key, (down, up, alpha)) in parts {
            let (down, up) = match (down, up) {
                (Some(d), Some(u)) => (d, u),
                (None, _) => {
                    return Err(invalid(format!("module `{key}` has no down factor (`lora_A`/`lora_down`)")))
                }
                (_, None) => {
                    return Err(invalid(format!("module `{key}` has no up factor (`lora_B`/`lora_up`)")))
                }
            };
            if down.dim() < 2 || up.dim() < 2 {
                return Err(invalid(format!(
                    "module `{key}`: factors are {:?} (down) and {:?} (up), expected at least 2-D",
                    down.size(),
                    up.size()
                )));
            }
            modules.push(Module { key, down, up, alpha });
        }
        Ok(Lora { origin, modules, alpha: None })
    }

    /// The alpha of modules whose file gives none (PEFT's `lora_alpha`).
    #[must_use]
    pub fn alpha(mut self, alpha: f64) -> Lora {
        self.alpha = Some(alpha);
        self
    }

    /// The module keys, as written in the file (without the factor suffix).
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.iter().map(|m| m.key.as_str())
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether there are no modules.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// One squashed commit applying every module, with `multiplier · alpha / rank`
    /// as each module's scale, onto the weights named in `names` (a model's
    /// tensor names: [`Managed::tensor_names`](crate::Managed::tensor_names),
    /// `VarStore::variables().keys()`, ...).
    ///
    /// A module `m` maps onto `m.weight`, after dropping wrapper prefixes
    /// (`base_model.model.`); failing that onto the one weight whose name ends
    /// with it, or that it ends with, at a `.` boundary; failing that, for
    /// kohya keys (`lora_unet_a_b_c`), onto the one weight whose name with `_`
    /// for `.` matches the same way. A module that matches nothing is an
    /// [`Error::UnmatchedKey`] naming it and the names tried; one that matches
    /// several weights at the same step is an [`Error::AmbiguousKey`] naming
    /// it and the candidates.
    pub fn to_commit<S: AsRef<str>>(
        &self,
        names: impl IntoIterator<Item = S>,
        multiplier: f64,
    ) -> Result<Commit> {
        let names: Vec<String> = names.into_iter().map(|s| s.as_ref().to_string()).collect();
        let bases: Vec<&str> = names.iter().map(|n| n.strip_suffix(".weight").unwrap_or(n)).collect();
        let mut commits = Vec::with_capacity(self.modules.len());
        for m in &self.modules {
            let target = match_key(&m.key, &names, &bases)?;
            let rank = m.down.size()[0];
            let scale = match m.alpha.or(self.alpha) {
                Some(alpha) if rank > 0 => multiplier * alpha / rank as f64,
                _ => multiplier,
            };
            commits.push(Commit::lora(target, m.down.shallow_clone(), m.up.shallow_clone(), scale));
        }
        Ok(Commit::squash(commits).named(format!("lora {}", self.origin)))
    }
}

impl fmt::Debug for Lora {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lora")
            .field("origin", &self.origin)
            .field("modules", &self.modules.len())
            .field("alpha", &self.alpha)
            .finish()
    }
}

/// `s` is `suffix`, or ends with `sep` + `suffix`.
fn ends_at(s: &str, suffix: &str, sep: char) -> bool {
    s == suffix || (s.ends_with(suffix) && s[..s.len() - suffix.len()].ends_with(sep))
}

fn match_key(key: &str, names: &[String], bases: &[&str]) -> Result<String> {
    let k = WRAPPERS.iter().find_map(|p| key.strip_prefix(p)).unwrap_or(key);
    let unique = |hits: Vec<usize>| -> Result<Option<String>> {
        match hits.len() {
            0 => Ok(None),
            1 => Ok(Some(names[hits[0]].clone())),
            _ => Err(Error::AmbiguousKey {
                key: key.into(),
                candidates: hits.iter().map(|&i| names[i].clone()).collect(),
            }),
        }
    };
    let exact = format!("{k}.weight");
    if let Some(n) = names.iter().find(|n| **n == exact) {
        return Ok(n.clone());
    }
    let hits = (0..names.len()).filter(|&i| ends_at(bases[i], k, '.') || ends_at(k, bases[i], '.')).collect();
    if let Some(n) = unique(hits)? {
        return Ok(n);
    }
    let kk = KOHYA.iter().find_map(|p| k.strip_prefix(p)).unwrap_or(k).replace('.', "_");
    let hits = (0..names.len())
        .filter(|&i| {
            let nb = bases[i].replace('.', "_");
            ends_at(&nb, &kk, '_') || ends_at(&kk, &nb, '_')
        })
        .collect();
    if let Some(n) = unique(hits)? {
        return Ok(n);
    }
    let some: Vec<String> = names.iter().take(6).map(|n| format!("`{n}`")).collect();
    Err(Error::UnmatchedKey {
        key: key.into(),
        detail: format!(
            "tried `{exact}` and suffix matches among {} tensor(s) ({}{})",
            names.len(),
            some.join(", "),
            if names.len() > some.len() { ", ..." } else { "" }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> (Vec<String>, Vec<String>) {
        let n: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        let b = n.iter().map(|s| s.strip_suffix(".weight").unwrap_or(s).to_string()).collect();
        (n, b)
    }

    fn m(key: &str, v: &[&str]) -> Result<String> {
        let (n, b) = names(v);
        let b: Vec<&str> = b.iter().map(String::as_str).collect();
        match_key(key, &n, &b)
    }

    #[test]
    fn keys_map_onto_names() {
        let model = ["layers.0.q.weight", "layers.0.q.bias", "layers.1.q.weight", "head.weight"];
        assert_eq!(m("layers.0.q", &model).unwrap(), "layers.0.q.weight");
        assert_eq!(m("base_model.model.layers.1.q", &model).unwrap(), "layers.1.q.weight");
        assert_eq!(m("model.head", &model).unwrap(), "head.weight", "extra prefix on the key");
        assert_eq!(m("lora_unet_layers_1_q", &model).unwrap(), "layers.1.q.weight", "kohya");
        let prefixed = ["net.layers.0.q.weight", "net.head.weight"];
        assert_eq!(m("layers.0.q", &prefixed).unwrap(), "net.layers.0.q.weight", "prefix on the model");
        match m("q", &model) {
            Err(e @ Error::AmbiguousKey { .. }) => {
                let msg = e.to_string();
                assert_eq!(
                    msg,
                    "LoRA key `q` matches several tensors of the model (`layers.0.q.weight`, \
                     `layers.1.q.weight`); it must match exactly one"
                );
                assert!(!msg.contains("no tensor"), "{msg}");
            }
            other => panic!("expected AmbiguousKey, got {other:?}"),
        }
        // Ambiguous among kohya-style matches too.
        match m("lora_unet_q", &["a.q.weight", "b.q.weight"]) {
            Err(Error::AmbiguousKey { key, candidates }) => {
                assert_eq!(
                    (key.as_str(), candidates),
                    ("lora_unet_q", vec!["a.q.weight".into(), "b.q.weight".into()])
                );
            }
            other => panic!("expected AmbiguousKey, got {other:?}"),
        }
        match m("layers.7.k", &model) {
            Err(e @ Error::UnmatchedKey { .. }) => {
                let msg = e.to_string();
                assert!(msg.starts_with("LoRA key `layers.7.k` matches no tensor of the model: "), "{msg}");
                assert!(msg.contains("`layers.7.k.weight`") && !msg.contains("several"), "{msg}");
            }
            other => panic!("expected UnmatchedKey, got {other:?}"),
        }
    }

    #[test]
    fn malformed_files_name_the_key() {
        let t = || Tensor::zeros([2, 3], tch::kind::FLOAT_CPU);
        let err = Lora::from_tensors([("a.lora_A.weight", t())]).unwrap_err().to_string();
        assert!(err.contains("`a`") && err.contains("up factor"), "{err}");
        let err = Lora::from_tensors([("a.something", t())]).unwrap_err().to_string();
        assert!(err.contains("a.something"), "{err}");
        let err = Lora::from_tensors([("a.lora_A.weight", t()), ("a.lora_B.weight", t()), ("a.alpha", t())])
            .unwrap_err();
        assert!(err.to_string().contains("scalar"), "{err}");
    }
}
