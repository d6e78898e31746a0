//! The catalogue: the JSON format, its entries, and the checks made on every
//! path and source it names before anything touches the disk or the network.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::source::Source;
use crate::{Error, Result};

/// What a model is, which decides how [`Registry::load`](super::Registry::load)
/// loads it and which folder of the cache its files go to.
///
/// In a catalogue: `"torchscript"`, `"safetensors"` (a state dict) or
/// `"lora"` (an adapter: a LoRA safetensors file, or a PEFT folder with
/// `adapter_config.json`), case-insensitive, with a few aliases
/// (`"state_dict"`, `"lora_adapter"`, `"peft"`). Any other string is kept as
/// [`ModelType::Other`]: listed, downloaded and validated, not loaded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ModelType {
    /// A TorchScript archive, loaded as a `tch::CModule`.
    TorchScript,
    /// A safetensors state dict, loaded as a [`TensorSet`](crate::TensorSet).
    SafeTensors,
    /// A LoRA adapter, loaded as a [`Lora`](crate::Lora).
    Lora,
    /// Any other type, as written in the catalogue (lowercase).
    Other(String),
}

impl ModelType {
    /// The type's name as written in a catalogue, and the name of its folder
    /// in sire's cache.
    pub fn as_str(&self) -> &str {
        match self {
            ModelType::TorchScript => "torchscript",
            ModelType::SafeTensors => "safetensors",
            ModelType::Lora => "lora",
            ModelType::Other(s) => s,
        }
    }
}

impl FromStr for ModelType {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase().replace('-', "_");
        Ok(match lower.as_str() {
            "torchscript" | "ts" | "jit" => ModelType::TorchScript,
            "safetensors" | "state_dict" | "safetensors_state_dict" | "statedict" => ModelType::SafeTensors,
            "lora" | "lora_adapter" | "peft" | "adapter" => ModelType::Lora,
            _ => ModelType::Other(lower),
        })
    }
}

impl fmt::Display for ModelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ModelType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One file of a model: its path relative to the model type's folder of the
/// cache (for files from the hub: its path in the repository, see
/// [`Entry`]), its sha256, and where to download it from.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct FileSpec {
    /// The path as written in the catalogue (`config.files[].path`, or
    /// `file_path/file_name` of a download that no `files` entry names).
    pub path: String,
    /// The sha256 (64 lowercase hex digits), if the catalogue gives one.
    pub sha256: Option<String>,
    /// Where to download it from (`config.download[].file_url`), if anywhere.
    pub url: Option<String>,
    /// Fields of the file's entries that sire does not use, kept as written.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
    #[serde(skip)]
    pub(crate) source: Option<Source>,
}

/// One model of the catalogue.
///
/// ```json
/// {
///   "resnet18": {
///     "name": "ResNet-18",
///     "type": "torchscript",
///     "description": "ImageNet classifier",
///     "license": "bsd-3-clause",
///     "config": {
///       "files": [{ "path": "resnet18/model.pt", "sha256": "9f86d0…" }],
///       "download": [{ "file_name": "model.pt", "file_path": "resnet18",
///                      "file_url": "https://example.org/resnet18.pt" }]
///     }
///   }
/// }
/// ```
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Entry {
    /// The key the model is known by.
    pub key: String,
    /// Its display name (the key when the catalogue gives none).
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub model_type: ModelType,
    /// Its description (empty when the catalogue gives none).
    pub description: String,
    /// Its files, in catalogue order: the first is the model's main file.
    pub files: Vec<FileSpec>,
    /// Every other field of the entry (and of its `config`), kept as written:
    /// license, tags, task... Filterable with [`Filter::metadata`](super::Filter::metadata).
    pub metadata: Map<String, Value>,
    /// The catalogue the entry comes from.
    pub origin: PathBuf,
}

#[derive(Deserialize)]
struct RawEntry {
    name: Option<String>,
    #[serde(rename = "type")]
    model_type: String,
    description: Option<String>,
    #[serde(default)]
    config: RawConfig,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawConfig {
    #[serde(default)]
    files: Vec<RawFile>,
    #[serde(default)]
    download: Vec<RawDownload>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct RawFile {
    path: String,
    sha256: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct RawDownload {
    file_name: String,
    #[serde(default)]
    file_path: String,
    file_url: String,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Parses a catalogue: a JSON object from keys to entries. Syntax and type
/// errors name the origin, line and column; paths and sources are checked.
pub(crate) fn parse(text: &str, origin: &Path) -> Result<Vec<Entry>> {
    let located = |e: serde_json::Error| Error::Catalogue {
        path: origin.to_path_buf(),
        line: e.line(),
        column: e.column(),
        reason: e.to_string().rsplit_once(" at line ").map_or_else(|| e.to_string(), |(r, _)| r.to_string()),
    };
    let raw: BTreeMap<String, RawEntry> = serde_json::from_str(text).map_err(located)?;
    raw.into_iter().map(|(key, e)| entry(key, e, origin).map_err(|e| in_catalogue(e, origin))).collect()
}

/// Names the catalogue file in an entry's error.
fn in_catalogue(e: Error, origin: &Path) -> Error {
    let at = |reason: String| format!("{reason} (in catalogue {})", origin.display());
    match e {
        Error::InvalidEntry { key, reason } => Error::InvalidEntry { key, reason: at(reason) },
        Error::UnsafePath { key, path, reason } => Error::UnsafePath { key, path, reason: at(reason) },
        other => other,
    }
}

fn entry(key: String, raw: RawEntry, origin: &Path) -> Result<Entry> {
    let invalid = |reason: String| Error::InvalidEntry { key: key.clone(), reason };
    if key.is_empty() || key.chars().any(|c| c.is_control()) {
        return Err(invalid("the key is empty or holds control characters".into()));
    }
    let model_type: ModelType = raw.model_type.parse().unwrap_or_else(|e| match e {});
    if let ModelType::Other(t) = &model_type {
        if t.is_empty()
            || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            || t.starts_with('.')
        {
            return Err(invalid(format!(
                "type `{}` is not a plain name (letters, digits, `_`, `.`)",
                raw.model_type
            )));
        }
    }
    let mut files = Vec::new();
    for f in raw.config.files {
        check_relative(&key, &f.path)?;
        let sha256 = f.sha256.map(|h| normalize_sha256(&key, &f.path, &h)).transpose()?;
        if files.iter().any(|x: &FileSpec| x.path == f.path) {
            return Err(invalid(format!("file `{}` is listed twice", f.path)));
        }
        files.push(FileSpec { path: f.path, sha256, url: None, extra: f.extra, source: None });
    }
    for d in raw.config.download {
        if d.file_name.is_empty() || d.file_name.contains('/') {
            return Err(Error::UnsafePath {
                key: key.clone(),
                path: d.file_name,
                reason: "`file_name` must be a single path component".into(),
            });
        }
        let path = if d.file_path.is_empty() || d.file_path == "." {
            d.file_name.clone()
        } else {
            format!("{}/{}", d.file_path.trim_end_matches('/'), d.file_name)
        };
        check_relative(&key, &path)?;
        let source = Source::parse(&d.file_url)
            .map_err(|reason| invalid(format!("file_url {:?}: {reason}", d.file_url)))?;
        if let Source::Hf { path: repo_path, .. } = &source {
            check_relative(&key, repo_path)?;
        }
        match files.iter_mut().find(|f| f.path == path) {
            Some(f) if f.url.is_some() => return Err(invalid(format!("file `{path}` has two downloads"))),
            Some(f) => {
                f.url = Some(d.file_url);
                f.source = Some(source);
                f.extra.extend(d.extra);
            }
            None => files.push(FileSpec {
                path,
                sha256: None,
                url: Some(d.file_url),
                extra: d.extra,
                source: Some(source),
            }),
        }
    }
    let mut metadata = raw.extra;
    for (k, v) in raw.config.extra {
        metadata.entry(k).or_insert(v);
    }
    // Derived from the disk, never taken from a catalogue.
    if metadata.remove("available").is_some() {
        tracing::debug!(key = %key, "ignoring the catalogue's `available` field: it is derived from the cache");
    }
    Ok(Entry {
        name: raw.name.unwrap_or_else(|| key.clone()),
        key,
        model_type,
        description: raw.description.unwrap_or_default(),
        files,
        metadata,
        origin: origin.to_path_buf(),
    })
}

fn normalize_sha256(key: &str, file: &str, h: &str) -> Result<String> {
    let h = h.trim().to_ascii_lowercase();
    let h = h.strip_prefix("sha256:").unwrap_or(&h).to_string();
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidEntry {
            key: key.into(),
            reason: format!("file `{file}`: sha256 {h:?} is not 64 hex digits"),
        });
    }
    Ok(h)
}

/// Refuses a catalogue path that could leave the folder it is relative to:
/// empty, absolute, with `..` (or `.`) components, a backslash or a NUL.
pub(crate) fn check_relative(key: &str, path: &str) -> Result<()> {
    let refuse =
        |reason: &str| Err(Error::UnsafePath { key: key.into(), path: path.into(), reason: reason.into() });
    if path.is_empty() {
        return refuse("the path is empty");
    }
    if path.contains('\0') || path.contains('\\') {
        return refuse("the path holds a NUL or a backslash");
    }
    if path.starts_with('/') {
        return refuse("the path is absolute");
    }
    for c in Path::new(path).components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => {
                return refuse("the path has a `..` component and would escape the cache")
            }
            _ => return refuse("the path has a component that is not a plain name"),
        }
    }
    if path.split('/').any(|c| c.is_empty() || c == ".") {
        return refuse("the path has an empty or `.` component");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        for ok in ["a", "a/b.pt", "x/y/z.safetensors", "..a/b"] {
            check_relative("k", ok).unwrap();
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../b", "a//b", "./a", "a/.", "a\\b"] {
            assert!(matches!(check_relative("k", bad), Err(Error::UnsafePath { .. })), "{bad:?} accepted");
        }
    }

    #[test]
    fn types_parse_with_aliases() {
        assert_eq!("TorchScript".parse::<ModelType>().unwrap(), ModelType::TorchScript);
        assert_eq!("state_dict".parse::<ModelType>().unwrap(), ModelType::SafeTensors);
        assert_eq!("LoRA-adapter".parse::<ModelType>().unwrap(), ModelType::Lora);
        assert_eq!("onnx".parse::<ModelType>().unwrap(), ModelType::Other("onnx".into()));
    }

    #[test]
    fn downloads_join_files_and_metadata_is_kept() {
        let text = r#"{"m": {"type": "safetensors", "license": "mit", "available": true,
            "config": {"task": "vision",
              "files": [{"path": "m/w.safetensors", "sha256": "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "note": 1}],
              "download": [{"file_name": "w.safetensors", "file_path": "m", "file_url": "https://x.org/w"},
                           {"file_name": "extra.json", "file_url": "file:///tmp/extra.json"}]}}}"#;
        let e = parse(text, Path::new("c.json")).unwrap().remove(0);
        assert_eq!(e.name, "m");
        assert_eq!(e.files.len(), 2);
        assert_eq!(e.files[0].sha256.as_deref(), Some("a".repeat(64).as_str()));
        assert_eq!(e.files[0].url.as_deref(), Some("https://x.org/w"));
        assert_eq!(e.files[0].extra["note"], 1);
        assert_eq!(e.files[1].path, "extra.json");
        assert!(e.files[1].sha256.is_none());
        assert_eq!(e.metadata["license"], "mit");
        assert_eq!(e.metadata["task"], "vision");
        assert!(!e.metadata.contains_key("available"), "`available` is never read from a catalogue");
    }
}
