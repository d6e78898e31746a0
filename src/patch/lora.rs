//! LoRA files: factors read from safetensors in the common layouts, mapped
//! onto a model's tensor names as one [`Commit`]. PEFT's adapter folders are
//! read in `peft.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use safetensors::SafeTensors;
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
/// `lora_alpha` (and per-module ranks and alphas) in `adapter_config.json`:
/// read the whole folder with [`Lora::from_peft`], which fixes every module's
/// scale exactly as PEFT computes it.
///
/// Factors and alphas must be finite: a NaN or an infinity is an
/// [`Error::InvalidLora`] naming the key, as is a file that is not valid
/// safetensors (with the parser's reason).
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
    pub(super) origin: String,
    pub(super) modules: Vec<Module>,
    pub(super) alpha: Option<f64>,
    /// Whole tensors that replace the model's (PEFT's `modules_to_save`),
    /// keyed as in the file without wrapper prefixes.
    pub(super) replacements: Vec<(String, Tensor)>,
}

pub(super) struct Module {
    pub(super) key: String,
    pub(super) down: Tensor,
    pub(super) up: Tensor,
    pub(super) alpha: Option<f64>,
    /// `alpha / rank` (or PEFT's `alpha / sqrt(rank)`) fixed by the adapter's
    /// config; wins over `alpha`.
    pub(super) scale: Option<f64>,
    /// The weight is stored `[in, out]` (PEFT's `fan_in_fan_out`, GPT-2's `Conv1D`).
    pub(super) transposed: bool,
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
    ///
    /// A file that cannot be read, or is not valid safetensors (bad header,
    /// truncated), is an [`Error::InvalidLora`] naming the file and the reason.
    ///
    /// ```
    /// # fn main() -> sire::Result<()> {
    /// let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/peft/kohya");
    /// let lora = sire::Lora::from_safetensors(dir.join("lora.safetensors"))?;
    /// let base = sire::TensorSet::from_safetensors(dir.join("base.safetensors"))?;
    /// let commit = lora.to_commit(base.names(), 0.75)?;
    /// assert!(commit.targets().any(|t| t == "down_blocks.0.attentions.0.proj_in.weight"));
    /// # Ok(()) }
    /// ```
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Lora> {
        let path = path.as_ref();
        let tensors = read_safetensors(path)?;
        Lora::parse(path.display().to_string(), tensors)
    }

    /// Builds a `Lora` from named tensors laid out as in a LoRA file.
    pub fn from_tensors<S: Into<String>>(tensors: impl IntoIterator<Item = (S, Tensor)>) -> Result<Lora> {
        Lora::parse("tensors".into(), tensors.into_iter().map(|(n, t)| (n.into(), t)).collect())
    }

    pub(super) fn parse(origin: String, tensors: Vec<(String, Tensor)>) -> Result<Lora> {
        let invalid = |reason: String| Error::InvalidLora { origin: origin.clone(), reason };
        let mut parts: BTreeMap<String, Factors> = BTreeMap::new();
        for (name, t) in tensors {
            if name.ends_with(".lora_magnitude_vector") || name.contains(".lora_magnitude_vector.") {
                return Err(invalid(format!(
                    "key `{name}` is a DoRA magnitude vector (`use_dora`); DoRA adapters are not supported"
                )));
            }
            if name.contains(".lora_embedding_A") || name.contains(".lora_embedding_B") {
                return Err(invalid(format!(
                    "key `{name}` is a LoRA factor of an embedding layer; embedding LoRA is not supported"
                )));
            }
            let Some((module, role)) = SUFFIXES
                .iter()
                .find_map(|(sfx, role)| name.strip_suffix(sfx).map(|m| (m.to_string(), *role)))
            else {
                return Err(invalid(format!(
                    "key `{name}` is not a LoRA factor (expected `<module>.lora_A.weight`, `.lora_B.weight`, \
                     `.lora_down.weight`, `.lora_up.weight` or `.alpha`)"
                )));
            };
            if !matches!(role, Role::Alpha) {
                if let Some(what) = non_finite(&t) {
                    return Err(invalid(format!("LoRA factor `{name}` holds {what}")));
                }
            }
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
                    if !v.is_finite() {
                        return Err(invalid(format!("`{name}` is {v}; an alpha must be finite")));
                    }
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
            modules.push(Module { key, down, up, alpha, scale: None, transposed: false });
        }
        Ok(Lora { origin, modules, alpha: None, replacements: Vec::new() })
    }

    /// The alpha of modules whose file gives none. Modules read by
    /// [`Lora::from_peft`] keep the scales of their `adapter_config.json`.
    #[must_use]
    pub fn alpha(mut self, alpha: f64) -> Lora {
        self.alpha = Some(alpha);
        self
    }

    /// The module keys, as written in the file (without the factor suffix).
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.iter().map(|m| m.key.as_str())
    }

    /// The keys of whole tensors that replace the model's (PEFT's
    /// `modules_to_save`, such as `classifier.weight`), without wrapper prefixes.
    pub fn replacements(&self) -> impl Iterator<Item = &str> {
        self.replacements.iter().map(|(k, _)| k.as_str())
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
    /// as each module's scale (`multiplier ·` the scale an adapter config
    /// fixed, for [`Lora::from_peft`]), onto the weights named in `names` (a
    /// model's tensor names:
    /// [`Managed::tensor_names`](crate::Managed::tensor_names),
    /// `VarStore::variables().keys()`, ...). Replacement tensors
    /// ([`Lora::replacements`]) come after the LoRA updates, whatever the
    /// multiplier: a retrained head is not scaled.
    ///
    /// A module `m` maps onto `m.weight`, after dropping wrapper prefixes
    /// (`base_model.model.`); failing that onto the one weight whose name ends
    /// with it at a `.` boundary; failing that onto the one it ends with. A
    /// kohya key (no `.`, `lora_unet_a_b_c`, `lora_te_...`) maps onto the
    /// weight whose name with `_` for `.` equals it without its prefix
    /// (`a.b_c.weight`); failing that onto the one whose name so written ends
    /// with it at a `_` boundary (`unet.a.b_c.weight`); failing that onto the
    /// one it ends with. A replacement `m.p`
    /// maps onto the tensor `m.p` or the one whose name ends with `.m.p`.
    /// A key that matches nothing is an [`Error::UnmatchedKey`] naming it and
    /// the names tried; one that matches several tensors at the same step is
    /// an [`Error::AmbiguousKey`] naming it and the candidates.
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
            let scale = match (m.scale, m.alpha.or(self.alpha)) {
                (Some(scale), _) => multiplier * scale,
                (None, Some(alpha)) if rank > 0 => multiplier * alpha / rank as f64,
                _ => multiplier,
            };
            commits.push(if m.transposed {
                // W is stored [in, out]: W += scale · (B·A)ᵀ = scale · Aᵀ·Bᵀ.
                let a = m.up.tr().contiguous();
                let b = m.down.tr().contiguous();
                Commit::lora(target, a, b, scale)
            } else {
                Commit::lora(target, m.down.shallow_clone(), m.up.shallow_clone(), scale)
            });
        }
        for (key, value) in &self.replacements {
            let target = match_name(key, &names)?;
            commits.push(Commit::replace(target, value.shallow_clone()));
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
            .field("replacements", &self.replacements.len())
            .finish()
    }
}

/// `s` is `suffix`, or ends with `sep` + `suffix`.
fn ends_at(s: &str, suffix: &str, sep: char) -> bool {
    s == suffix || (s.ends_with(suffix) && s[..s.len() - suffix.len()].ends_with(sep))
}

/// The model tensor (among `names`, with `bases` their names less `.weight`)
/// that LoRA module `key` patches; see [`Lora::to_commit`].
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
    // The model's names carry a prefix the key lacks, or the other way round.
    for hits in [
        (0..names.len()).filter(|&i| ends_at(bases[i], k, '.')).collect(),
        (0..names.len()).filter(|&i| ends_at(k, bases[i], '.')).collect(),
    ] {
        if let Some(n) = unique(hits)? {
            return Ok(n);
        }
    }
    let mut tried = format!("`{exact}` and suffix matches");
    if !k.contains('.') {
        // A kohya key: the module path with `_` for `.`, behind a prefix
        // naming the network. Segments may hold `_` themselves (`to_q`), so
        // the path is found by writing each tensor's name the same way.
        let kk = KOHYA.iter().find_map(|p| k.strip_prefix(p)).unwrap_or(k);
        let flat: Vec<String> = bases.iter().map(|b| b.replace('.', "_")).collect();
        for hits in [
            (0..names.len()).filter(|&i| flat[i] == kk).collect(),
            (0..names.len()).filter(|&i| ends_at(&flat[i], kk, '_')).collect(),
            (0..names.len()).filter(|&i| ends_at(kk, &flat[i], '_')).collect(),
        ] {
            if let Some(n) = unique(hits)? {
                return Ok(n);
            }
        }
        tried = format!("{tried}, then `{kk}` against the names with `_` for `.`");
    }
    Err(Error::UnmatchedKey { key: key.into(), detail: format!("tried {tried} {}", among(names)) })
}

/// The model tensor that replacement `key` (a module path and a parameter
/// name, such as `classifier.weight`) replaces: the tensor of that name, or
/// the one whose name ends with `.key`.
fn match_name(key: &str, names: &[String]) -> Result<String> {
    if let Some(n) = names.iter().find(|n| *n == key) {
        return Ok(n.clone());
    }
    let hits: Vec<&String> = names.iter().filter(|n| ends_at(n, key, '.')).collect();
    match hits.len() {
        1 => Ok(hits[0].clone()),
        0 => Err(Error::UnmatchedKey {
            key: key.into(),
            detail: format!("tried `{key}` and names ending with `.{key}` {}", among(names)),
        }),
        _ => Err(Error::AmbiguousKey { key: key.into(), candidates: hits.into_iter().cloned().collect() }),
    }
}

/// "among N tensor(s) (`a`, `b`, ...)", for error messages.
fn among(names: &[String]) -> String {
    let some: Vec<String> = names.iter().take(6).map(|n| format!("`{n}`")).collect();
    format!(
        "among {} tensor(s) ({}{})",
        names.len(),
        some.join(", "),
        if names.len() > some.len() { ", ..." } else { "" }
    )
}

/// What is not finite in a floating-point tensor (`NaN`, `inf`), if anything.
pub(super) fn non_finite(t: &Tensor) -> Option<&'static str> {
    if !t.is_floating_point() || t.isfinite().all().int64_value(&[]) != 0 {
        return None;
    }
    Some(if t.isnan().any().int64_value(&[]) != 0 { "NaN" } else { "an infinity" })
}

/// Every tensor of a safetensors file, copied onto the CPU, in file order.
/// Read with the `safetensors` parser, so a malformed file is an
/// [`Error::InvalidLora`] with its reason (never libtorch's stack text).
pub(super) fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let invalid = |reason: String| Error::InvalidLora { origin: path.display().to_string(), reason };
    let bytes = std::fs::read(path).map_err(|e| invalid(format!("cannot read the file: {e}")))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| invalid(format!("not a valid safetensors file: {e}")))?;
    let mut views: Vec<_> = file.iter().collect();
    views.sort_by_key(|(name, v)| (v.data().as_ptr() as usize, *name));
    let mut out = Vec::with_capacity(views.len());
    for (name, view) in views {
        let Some(kind) = crate::tier::spill::dtype_to_kind(view.dtype()) else {
            return Err(invalid(format!(
                "tensor `{name}` has dtype {:?}, which sire does not read",
                view.dtype()
            )));
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| invalid(format!("tensor `{name}` cannot be read: {}", short(&e.to_string()))))?;
        out.push((name.to_string(), t));
    }
    Ok(out)
}

/// The first line of a libtorch message (without its C++ stack).
fn short(msg: &str) -> &str {
    msg.lines().next().unwrap_or(msg)
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
    fn kohya_keys_map_onto_dotted_names() {
        let model = [
            "down_blocks.0.attentions.0.proj_in.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
            "proj_in.weight",
        ];
        let ok = |key: &str, want: &str| assert_eq!(m(key, &model).unwrap(), want, "{key}");
        ok("lora_unet_down_blocks_0_attentions_0_proj_in", model[0]);
        ok("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", model[1]);
        ok("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj", model[2]);
        ok("lora_te_text_model_encoder_layers_0_self_attn_q_proj", model[3]);
        ok("lora_unet_proj_in", model[4]);
        // With the pipeline's prefix on the model's names.
        let prefixed: Vec<String> = model.iter().map(|n| format!("unet.{n}")).collect();
        let prefixed: Vec<&str> = prefixed.iter().map(String::as_str).collect();
        assert_eq!(
            m("lora_unet_down_blocks_0_attentions_0_proj_in", &prefixed).unwrap(),
            "unet.down_blocks.0.attentions.0.proj_in.weight",
            "a name ending with the key wins over a shorter name the key ends with"
        );
        // `_` inside a segment or between segments reads the same: ambiguous.
        match m("lora_unet_ff_net_0_proj", &["ff.net_0.proj.weight", "ff.net.0.proj.weight"]) {
            Err(Error::AmbiguousKey { candidates, .. }) => assert_eq!(candidates.len(), 2),
            other => panic!("expected AmbiguousKey, got {other:?}"),
        }
        // A dotted key is never read as a kohya key.
        assert!(matches!(m("blocks.0.to.q", &["blocks_0.to_q.weight"]), Err(Error::UnmatchedKey { .. })));
    }

    #[test]
    fn replacements_map_onto_names() {
        let names: Vec<String> =
            ["classifier.weight", "model.score.weight", "a.score.weight"].map(String::from).into();
        assert_eq!(match_name("classifier.weight", &names).unwrap(), "classifier.weight");
        assert!(matches!(match_name("score.weight", &names), Err(Error::AmbiguousKey { .. })));
        assert_eq!(match_name("model.score.weight", &names).unwrap(), "model.score.weight");
        assert!(matches!(match_name("head.weight", &names), Err(Error::UnmatchedKey { .. })));
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
