//! PEFT adapter folders: `adapter_config.json` beside `adapter_model.safetensors`,
//! read into a [`Lora`] whose every module carries the scale PEFT gives it.

use std::path::Path;

use serde_json::{Map, Value};

use super::lora::{read_safetensors, Lora};
use crate::{Error, Result};

/// The prefix PEFT's `save_pretrained` puts before the model's module names.
const PEFT_PREFIX: &str = "base_model.model.";

/// Suffixes of the tensors that are LoRA factors (or refused LoRA variants).
const FACTORS: [&str; 6] = [
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_magnitude_vector",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_B.bias",
];

/// Config fields of LoRA variants that change the update or add tensors;
/// an adapter that sets one is refused (`null`, `false`, `{}` and `[]` mean unset).
const UNSUPPORTED: [(&str, &str); 8] = [
    ("use_dora", "DoRA"),
    ("lora_bias", "a bias on lora_B"),
    ("layer_replication", "layer replication"),
    ("target_parameters", "LoRA on bare parameters"),
    ("trainable_token_indices", "trainable tokens"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("use_qalora", "QA-LoRA"),
    ("use_bdlora", "BD-LoRA"),
];

/// What `from_peft` reads from `adapter_config.json`.
struct Config {
    r: i64,
    alpha: f64,
    /// In the file's order: PEFT takes the first key that matches.
    rank_pattern: Vec<(String, f64)>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
    fan_in_fan_out: bool,
    /// `None`: a regular expression or `all-linear` (not checked).
    target_modules: Option<Vec<String>>,
    modules_to_save: Vec<String>,
    /// Fields of [`UNSUPPORTED`] (and `bias`) that the config sets, with their values.
    refused: Vec<(&'static str, String)>,
}

impl Lora {
    /// Reads a PEFT LoRA adapter folder, as written by `save_pretrained`:
    /// `adapter_config.json` beside `adapter_model.safetensors`.
    ///
    /// Each module's scale is fixed as PEFT fixes it: `lora_alpha / r`, or
    /// `lora_alpha / sqrt(r)` with `use_rslora`, where `r` and `lora_alpha`
    /// come from the first key of `rank_pattern` / `alpha_pattern` (in the
    /// file's order) that matches the module's name at a `.` boundary, as
    /// PEFT's `get_pattern_key` does, else from `r` / `lora_alpha`. The rank
    /// so found must be the factors' rank. [`Lora::to_commit`] multiplies
    /// these scales by its `multiplier`; [`Lora::alpha`] does not change them.
    ///
    /// - `fan_in_fan_out: true` marks every weight as stored `[in, out]`
    ///   (GPT-2's `Conv1D`): the update is transposed. (PEFT itself decides
    ///   per layer type; sire follows the config for every module.)
    /// - `modules_to_save` tensors (a retrained `classifier` head) become
    ///   [replacements](Lora::replacements) of the model's tensors.
    /// - `target_modules`, when a list, must select every module in the file.
    ///
    /// Refused with [`Error::InvalidLora`] naming the key or field: a
    /// `peft_type` other than `LORA`; DoRA (`use_dora`, a
    /// `lora_magnitude_vector`), embedding factors (`lora_embedding_A`), and
    /// other variants that change the update (`lora_bias`,
    /// `layer_replication`, `target_parameters`, `trainable_token_indices`,
    /// `alora_invocation_tokens`, `use_qalora`, `use_bdlora`, `bias` other
    /// than `none`); a pattern key that is a regular expression beyond plain
    /// names; non-finite factors or scales; a tensor that is neither a factor
    /// nor under `modules_to_save`. A malformed `adapter_config.json` names
    /// the file, line and column; a malformed safetensors file names the file
    /// and the parser's reason.
    ///
    /// ```
    /// # fn main() -> sire::Result<()> {
    /// let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/peft");
    /// let base = sire::TensorSet::from_safetensors(data.join("base.safetensors"))?;
    /// let lora = sire::Lora::from_peft(data.join("modules_to_save"))?;
    /// assert_eq!(lora.replacements().collect::<Vec<_>>(), ["classifier.bias", "classifier.weight"]);
    /// let commit = lora.to_commit(base.names(), 1.0)?; // PEFT's own scales
    /// assert!(commit.targets().any(|t| t == "layers.0.q_proj.weight"));
    /// # Ok(()) }
    /// ```
    pub fn from_peft(dir: impl AsRef<Path>) -> Result<Lora> {
        let dir = dir.as_ref();
        let config_path = dir.join("adapter_config.json");
        let model_path = dir.join("adapter_model.safetensors");
        let config = read_config(&config_path)?;
        let origin = model_path.display().to_string();
        let invalid = |reason: String| Error::InvalidLora { origin: origin.clone(), reason };

        let mut factors = Vec::new();
        let mut replacements = Vec::new();
        for (name, t) in read_safetensors(&model_path)? {
            if FACTORS.iter().any(|f| name.ends_with(f)) || name.ends_with(".alpha") {
                factors.push((name, t));
                continue;
            }
            let key = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
            let key = key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".");
            if key.contains(".lora_") {
                return Err(invalid(format!("key `{name}` is a LoRA tensor sire does not know")));
            }
            let module = key.rsplit_once('.').map_or("", |(m, _)| m);
            if !config.modules_to_save.iter().any(|m| selects(module, m)) {
                return Err(invalid(format!(
                    "key `{name}` is neither a LoRA factor nor a tensor of `modules_to_save` ({:?})",
                    config.modules_to_save
                )));
            }
            replacements.push((key, t));
        }
        for (key, t) in &replacements {
            if super::lora::non_finite(t).is_some() {
                return Err(invalid(format!("replacement `{key}` holds a non-finite value")));
            }
        }

        let mut lora = Lora::parse(origin.clone(), factors)?;
        // Refused only now, so that a refused tensor (a DoRA magnitude) is named first.
        if let Some((field, v)) = config.refused.first() {
            let what = UNSUPPORTED
                .iter()
                .find(|(f, _)| f == field)
                .map_or("a bias trained with the adapter", |(_, w)| w);
            return Err(Error::InvalidLora {
                origin: config_path.display().to_string(),
                reason: format!("`{field}: {v}` ({what}) is not supported"),
            });
        }
        for m in &mut lora.modules {
            if m.alpha.is_some() {
                return Err(invalid(format!(
                    "module `{}` has an `.alpha` tensor; PEFT keeps alphas in the config",
                    m.key
                )));
            }
            let name = m.key.strip_prefix(PEFT_PREFIX).unwrap_or(&m.key);
            if let Some(targets) = &config.target_modules {
                if !targets.iter().any(|t| name == t || name.ends_with(&format!(".{t}"))) {
                    return Err(invalid(format!(
                        "module `{}` has factors, but `target_modules` ({targets:?}) does not select it",
                        m.key
                    )));
                }
            }
            let (rank_key, r) = pattern_value(&config.rank_pattern, name, "rank_pattern", &config_path)?
                .map_or((None, config.r as f64), |(k, v)| (Some(k), v));
            let alpha = pattern_value(&config.alpha_pattern, name, "alpha_pattern", &config_path)?
                .map_or(config.alpha, |(_, v)| v);
            let rank = m.down.size()[0];
            if r != rank as f64 {
                let source = rank_key.map_or("`r`".to_string(), |k| format!("`rank_pattern[\"{k}\"]`"));
                return Err(invalid(format!(
                    "module `{}` has rank {rank}, but the config gives it r = {r} ({source})",
                    m.key
                )));
            }
            let scale = if config.rslora { alpha / r.sqrt() } else { alpha / r };
            if !scale.is_finite() {
                return Err(invalid(format!("module `{}`: scale {alpha} / r({r}) is not finite", m.key)));
            }
            m.scale = Some(scale);
            m.transposed = config.fan_in_fan_out;
        }
        lora.replacements = replacements;
        Ok(lora)
    }
}

/// `module` is selected by `modules_to_save` entry `m`: PEFT's
/// `(^|.*\.)m($|\..*)` with `m` a plain name.
fn selects(module: &str, m: &str) -> bool {
    format!(".{module}.").contains(&format!(".{m}."))
}

/// The first `(key, value)` of `pattern` whose key matches `name` as PEFT's
/// `get_pattern_key` does (`re.match(rf"(.*\.)?({key})$", name)`).
fn pattern_value<'p>(
    pattern: &'p [(String, f64)],
    name: &str,
    field: &str,
    config: &Path,
) -> Result<Option<(&'p str, f64)>> {
    for (key, value) in pattern {
        if key.chars().any(|c| "\\^$*+?{}[]()|".contains(c)) {
            return Err(Error::InvalidLora {
                origin: config.display().to_string(),
                reason: format!(
                    "`{field}` key `{key}` is a regular expression; sire matches module names only \
                     (a `.` matches any character, as in PEFT)"
                ),
            });
        }
        if pattern_matches(key, name) {
            return Ok(Some((key, *value)));
        }
    }
    Ok(None)
}

/// `name` matches the regular expression `(.*\.)?(key)$`, where `key` holds
/// no metacharacter but `.` (any character).
fn pattern_matches(key: &str, name: &str) -> bool {
    let whole =
        |s: &str| s.len() == key.len() && s.bytes().zip(key.bytes()).all(|(a, b)| b == b'.' || a == b);
    whole(name) || name.char_indices().any(|(i, c)| c == '.' && whole(&name[i + 1..]))
}

fn read_config(path: &Path) -> Result<Config> {
    let invalid = |reason: String| Error::InvalidLora { origin: path.display().to_string(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(format!("cannot read the file: {e}")))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        invalid(format!("malformed JSON at line {}, column {}: {}", e.line(), e.column(), bare(&e)))
    })?;
    let Value::Object(obj) = value else {
        return Err(invalid("expected a JSON object".into()));
    };
    match obj.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => return Err(invalid(format!("`peft_type` is `{other}`; sire reads `LORA` adapters"))),
        None => return Err(invalid("no `peft_type` (expected `LORA`)".into())),
    }
    let number = |field: &str| -> Result<f64> {
        match obj.get(field) {
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| invalid(format!("`{field}` is {v}, expected a finite number"))),
            None => Err(invalid(format!("no `{field}`"))),
        }
    };
    let flag = |field: &str| -> Result<bool> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(invalid(format!("`{field}` is {v}, expected true or false"))),
        }
    };
    let r = number("r")?;
    if r < 1.0 || r.fract() != 0.0 {
        return Err(invalid(format!("`r` is {r}, expected a positive integer")));
    }
    let pattern = |field: &str| -> Result<Vec<(String, f64)>> {
        let map = match obj.get(field) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Object(m)) => m,
            Some(v) => return Err(invalid(format!("`{field}` is {v}, expected an object"))),
        };
        let order = object_keys(&text, field).unwrap_or_default();
        let mut keys: Vec<&String> = map.keys().collect();
        // File order (PEFT takes the first match); serde_json's map is sorted.
        keys.sort_by_key(|k| order.iter().position(|o| o == *k).unwrap_or(usize::MAX));
        keys.into_iter()
            .map(|k| match map[k].as_f64().filter(|x| x.is_finite()) {
                Some(v) => Ok((k.clone(), v)),
                None => Err(invalid(format!("`{field}[\"{k}\"]` is {}, expected a finite number", map[k]))),
            })
            .collect()
    };
    let names = |field: &str| -> Result<Option<Vec<String>>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(Some(Vec::new())),
            Some(Value::String(_)) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| invalid(format!("`{field}` holds {v}")))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(invalid(format!("`{field}` is {v}, expected a list of names"))),
        }
    };
    let target_modules = match obj.get("target_modules") {
        None | Some(Value::Null) => None,
        _ => names("target_modules")?,
    };
    let modules_to_save = names("modules_to_save")?
        .ok_or_else(|| invalid("`modules_to_save` is a string, expected a list of names".into()))?;
    let mut refused = refused_fields(&obj);
    if let Some(bias) = obj.get("bias").and_then(Value::as_str).filter(|b| *b != "none") {
        refused.push(("bias", format!("\"{bias}\"")));
    }
    Ok(Config {
        r: r as i64,
        alpha: number("lora_alpha")?,
        rank_pattern: pattern("rank_pattern")?,
        alpha_pattern: pattern("alpha_pattern")?,
        rslora: flag("use_rslora")?,
        fan_in_fan_out: flag("fan_in_fan_out")?,
        target_modules,
        modules_to_save,
        refused,
    })
}

/// The refused fields that `obj` sets, with their values.
fn refused_fields(obj: &Map<String, Value>) -> Vec<(&'static str, String)> {
    UNSUPPORTED
        .iter()
        .filter_map(|(field, _)| {
            let set = match obj.get(*field)? {
                Value::Null | Value::Bool(false) => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                _ => true,
            };
            set.then(|| (*field, obj[*field].to_string()))
        })
        .collect()
}

/// serde_json's message without its " at line L column C" tail.
fn bare(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

/// The keys of the object under top-level `field` of the JSON `text`, in the
/// file's order (serde_json's maps are sorted). `None` if `text` does not have
/// that shape; `text` has already been parsed, so it is valid JSON.
fn object_keys(text: &str, field: &str) -> Option<Vec<String>> {
    let mut s = Scanner { b: text.as_bytes(), i: 0 };
    s.expect(b'{')?;
    loop {
        let key = s.string()?;
        s.expect(b':')?;
        if key == field {
            s.expect(b'{')?;
            let mut keys = Vec::new();
            if s.peek()? == b'}' {
                return Some(keys);
            }
            loop {
                keys.push(s.string()?);
                s.expect(b':')?;
                s.skip_value()?;
                match s.next()? {
                    b',' => continue,
                    b'}' => return Some(keys),
                    _ => return None,
                }
            }
        }
        s.skip_value()?;
        if s.next()? != b',' {
            return None;
        }
    }
}

/// Just enough of a JSON reader to walk one object's keys in order.
struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&mut self) -> Option<u8> {
        while self.b.get(self.i)?.is_ascii_whitespace() {
            self.i += 1;
        }
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// A string token, decoded.
    fn string(&mut self) -> Option<String> {
        self.peek()?;
        let start = self.i;
        self.expect(b'"')?;
        while *self.b.get(self.i)? != b'"' {
            self.i += if self.b[self.i] == b'\\' { 2 } else { 1 };
        }
        self.i += 1;
        serde_json::from_slice(&self.b[start..self.i]).ok()
    }

    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => depth -= 1,
                        _ => {}
                    }
                    self.i += 1;
                    if depth == 0 {
                        return Some(());
                    }
                }
            }
            _ => {
                while !matches!(self.b.get(self.i)?, b',' | b'}' | b']') {
                    self.i += 1;
                }
                Some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_keys_match_as_in_peft() {
        // re.match(rf"(.*\.)?({key})$", name)
        assert!(pattern_matches("q_proj", "layers.0.q_proj"));
        assert!(pattern_matches("q_proj", "q_proj"));
        assert!(pattern_matches("layers.0.q_proj", "model.layers.0.q_proj"));
        assert!(!pattern_matches("proj", "layers.0.q_proj"), "only at a `.` boundary");
        assert!(!pattern_matches("q_proj", "layers.0.q_proj.base"), "anchored at the end");
        assert!(!pattern_matches("layers.1.fc1", "layers.0.fc1"));
        assert!(pattern_matches("layers.1.fc1", "layers_1_fc1"), "`.` is any character, as in the regex");
        let p = vec![("fc1".to_string(), 6.0), ("layers.1.fc1".to_string(), 3.0)];
        let cfg = Path::new("adapter_config.json");
        assert_eq!(
            pattern_value(&p, "layers.1.fc1", "rank_pattern", cfg).unwrap(),
            Some(("fc1", 6.0)),
            "first wins"
        );
        assert_eq!(pattern_value(&p, "layers.1.fc2", "rank_pattern", cfg).unwrap(), None);
        let re = vec![("layers\\.[01]\\.fc1".to_string(), 6.0)];
        match pattern_value(&re, "layers.1.fc1", "rank_pattern", cfg) {
            Err(Error::InvalidLora { reason, .. }) => {
                assert!(reason.contains("regular expression"), "{reason}")
            }
            other => panic!("expected InvalidLora, got {other:?}"),
        }
    }

    #[test]
    fn pattern_keys_keep_the_file_order() {
        let text = r#"{"a": [1, {"x": "}"}], "rank_pattern" : { "z.fc1": 1, "fc1": {"n": [2]}, "a\"b": 3 }, "r": 4}"#;
        assert_eq!(object_keys(text, "rank_pattern").unwrap(), ["z.fc1", "fc1", "a\"b"]);
        assert_eq!(object_keys(r#"{"rank_pattern": {}}"#, "rank_pattern").unwrap(), Vec::<String>::new());
        assert_eq!(object_keys(r#"{"r": 4}"#, "rank_pattern"), None);
    }

    #[test]
    fn modules_to_save_select_whole_segments() {
        assert!(selects("classifier", "classifier"));
        assert!(selects("model.score", "score"));
        assert!(selects("heads.classifier.out", "classifier"));
        assert!(!selects("my_classifier", "classifier"));
    }
}
