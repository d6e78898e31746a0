//! The model registry (feature `registry`): a JSON catalogue of models, a
//! cache shared with Hugging Face's, verified resumable downloads, and
//! [`Registry::load`] into a managed model.
//!
//! ```
//! # fn main() -> sire::Result<()> {
//! use sire::registry::{Filter, Registry};
//! let dir = tempfile::tempdir()?;
//! let weights = dir.path().join("w.safetensors");
//! tch::Tensor::write_safetensors(&[("w", tch::Tensor::ones([4], tch::kind::FLOAT_CPU))], &weights)?;
//! let catalogue = dir.path().join("catalogue.json");
//! std::fs::write(&catalogue, format!(
//!     r#"{{"ones": {{"type": "safetensors", "config": {{
//!         "files": [{{"path": "ones/w.safetensors", "sha256": "{}"}}],
//!         "download": [{{"file_path": "ones", "file_name": "w.safetensors", "file_url": "file://{}"}}]}}}}}}"#,
//!     sire::registry::sha256_file(&weights)?, weights.display()))?;
//! let registry = Registry::builder().cache_dir(dir.path().join("cache")).catalogue(&catalogue).build()?;
//! assert!(!registry.list(&Filter::new())?[0].available);
//! registry.download("ones")?;
//! assert!(registry.validate("ones")?.available);
//! # Ok(()) }
//! ```

mod cache;
pub(crate) mod catalogue;
mod fetch;
mod http;
mod pickle;
mod source;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tch::CModule;

pub use cache::{sha256_file, CacheDirs};
pub use catalogue::{Entry, FileSpec, ModelType};
pub use fetch::{FileState, FileStatus};

use cache::Place;
use http::Net;

use crate::{Error, Location, Lora, ManageOptions, Managed, ResourcePoolManagement, Result, TensorSet};

/// The public hub, when `HF_ENDPOINT` is not set.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

/// A catalogue of models, the caches their files live in, and the models
/// loaded from it.
///
/// Built with [`Registry::builder`]. `available` is never read from the
/// catalogue: a model is available when each of its files is in the cache and
/// has the catalogue's sha256 (remembered in a sidecar, recomputed when the
/// file's size or modification time changes).
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    overrides: Vec<Override>,
    dirs: CacheDirs,
    net: Net,
    allow_unhashed: bool,
    allow_pickle: bool,
    offline: bool,
    lock_timeout: Duration,
    pools: Option<ResourcePoolManagement>,
    loaded: parking_lot::Mutex<BTreeMap<String, (Kept, PathBuf)>>,
}

/// What the registry keeps of a model it loaded: a handle on a managed
/// model (returned again by the next `load`), or only the fact for an
/// adapter (a `Lora` is not `Sync`, and is read again by the next `load`).
enum Kept {
    TorchScript(Managed<CModule>),
    Tensors(Managed<TensorSet>),
    Lora,
}

/// A key that a later catalogue redefined (the later entry wins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Override {
    /// The key.
    pub key: String,
    /// The catalogue whose entry was replaced.
    pub previous: PathBuf,
    /// The catalogue whose entry is used.
    pub now: PathBuf,
}

/// Configures a [`Registry`].
///
/// | setting | builder | environment | default |
/// |---|---|---|---|
/// | catalogues | [`catalogue`](Self::catalogue) | | none |
/// | caches | [`cache_dir`](Self::cache_dir), [`hf_cache_dir`](Self::hf_cache_dir) | see [`CacheDirs`] | |
/// | hub endpoint | [`hf_endpoint`](Self::hf_endpoint) | `HF_ENDPOINT` | [`DEFAULT_HF_ENDPOINT`] |
/// | hub token | [`hf_token`](Self::hf_token) | `HF_TOKEN` | none |
/// | no network for `hf://` | [`offline`](Self::offline) | `HF_HUB_OFFLINE=1` | off |
/// | files without sha256 | [`allow_unhashed`](Self::allow_unhashed) | | refused |
/// | pickle weight files | [`allow_pickle`](Self::allow_pickle) | | refused |
/// | size limit per file | [`max_download_size`](Self::max_download_size) | | 256 GiB |
/// | retries, first backoff | [`retries`](Self::retries), [`backoff`](Self::backoff) | | 5, 500 ms (doubling) |
/// | connect and read timeout | [`timeout`](Self::timeout) | | 30 s |
/// | whole download of one file | [`download_deadline`](Self::download_deadline) | | none |
/// | wait for another process's lock | [`lock_timeout`](Self::lock_timeout) | | 10 min |
#[must_use]
#[derive(Debug, Clone)]
pub struct RegistryBuilder {
    catalogues: Vec<PathBuf>,
    sire_cache: Option<PathBuf>,
    hf_cache: Option<PathBuf>,
    endpoint: Option<String>,
    token: Option<Option<String>>,
    offline: Option<bool>,
    env: bool,
    allow_unhashed: bool,
    allow_pickle: bool,
    max_size: u64,
    retries: u32,
    backoff: Duration,
    timeout: Duration,
    deadline: Option<Duration>,
    lock_timeout: Duration,
    progress: bool,
    pools: Option<ResourcePoolManagement>,
}

impl Default for RegistryBuilder {
    fn default() -> Self {
        RegistryBuilder {
            catalogues: Vec::new(),
            sire_cache: None,
            hf_cache: None,
            endpoint: None,
            token: None,
            offline: None,
            env: true,
            allow_unhashed: false,
            allow_pickle: false,
            max_size: 256 << 30,
            retries: 5,
            backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(30),
            deadline: None,
            lock_timeout: Duration::from_secs(600),
            progress: true,
            pools: None,
        }
    }
}

impl RegistryBuilder {
    /// Adds a catalogue file; several merge in order, a later entry replacing
    /// an earlier one with the same key (see [`Registry::overrides`]).
    pub fn catalogue(mut self, path: impl Into<PathBuf>) -> Self {
        self.catalogues.push(path.into());
        self
    }

    /// sire's cache folder (instead of `SIRE_CACHE_HOME`...).
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.sire_cache = Some(dir.into());
        self
    }

    /// Hugging Face's hub cache folder (instead of `HF_HUB_CACHE`...).
    pub fn hf_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.hf_cache = Some(dir.into());
        self
    }

    /// The hub endpoint `hf://` files resolve against.
    pub fn hf_endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// The hub token (sent as a bearer token to the hub's host only), or none.
    pub fn hf_token(mut self, token: Option<String>) -> Self {
        self.token = Some(token);
        self
    }

    /// Never use the network for `hf://` files: only what the cache holds.
    pub fn offline(mut self, on: bool) -> Self {
        self.offline = Some(on);
        self
    }

    /// Whether `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` are read (on by
    /// default; builder settings win either way).
    pub fn env(mut self, on: bool) -> Self {
        self.env = on;
        self
    }

    /// Accepts files that the catalogue gives no sha256 for (off by default:
    /// such a file is [`Error::Unhashed`]).
    pub fn allow_unhashed(mut self, on: bool) -> Self {
        self.allow_unhashed = on;
        self
    }

    /// Accepts pickle-based weight files (raw pickles, `torch.save`
    /// archives); off by default ([`Error::Pickle`]). TorchScript archives
    /// are always accepted.
    pub fn allow_pickle(mut self, on: bool) -> Self {
        self.allow_pickle = on;
        self
    }

    /// The largest file a download may bring, in bytes.
    pub fn max_download_size(mut self, bytes: u64) -> Self {
        self.max_size = bytes;
        self
    }

    /// Retries of a download after a 5xx, a 429 or a cut connection.
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// The first wait before a retry; each retry doubles it (up to 30 s).
    pub fn backoff(mut self, first: Duration) -> Self {
        self.backoff = first;
        self
    }

    /// Connect and read timeout of each request.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest one file's download may take, retries included
    /// ([`Error::Download`] after it); none by default (the read timeout
    /// still ends a stalled connection).
    pub fn download_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    /// How long to wait for another process's lock on a file being
    /// downloaded or removed ([`Error::LockTimeout`] after it); 10 minutes
    /// by default.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Shows a progress bar on standard error while downloading (on by
    /// default; never drawn when standard error is not a terminal).
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// The instance [`Registry::load`] registers models with (the global one
    /// by default).
    pub fn pools(mut self, pools: ResourcePoolManagement) -> Self {
        self.pools = Some(pools);
        self
    }

    /// Reads the catalogues and builds the registry.
    pub fn build(self) -> Result<Registry> {
        let env = |k: &str| if self.env { std::env::var(k).ok().filter(|v| !v.is_empty()) } else { None };
        let mut dirs = CacheDirs::from_env();
        if let Some(d) = self.sire_cache {
            dirs.sire = d;
        }
        if let Some(d) = self.hf_cache {
            dirs.hf = d;
        }
        let endpoint =
            self.endpoint.or_else(|| env("HF_ENDPOINT")).unwrap_or_else(|| DEFAULT_HF_ENDPOINT.into());
        let token = self.token.unwrap_or_else(|| env("HF_TOKEN").or_else(|| env("HUGGING_FACE_HUB_TOKEN")));
        let offline = self.offline.unwrap_or_else(|| {
            env("HF_HUB_OFFLINE")
                .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        });
        let mut net =
            Net::new(endpoint, token, self.retries, self.backoff, self.max_size, self.timeout, self.progress);
        net.deadline = self.deadline;
        let mut registry = Registry {
            entries: BTreeMap::new(),
            overrides: Vec::new(),
            dirs,
            net,
            allow_unhashed: self.allow_unhashed,
            allow_pickle: self.allow_pickle,
            offline,
            lock_timeout: self.lock_timeout,
            pools: self.pools,
            loaded: parking_lot::Mutex::new(BTreeMap::new()),
        };
        for c in &self.catalogues {
            registry.add_catalogue(c)?;
        }
        Ok(registry)
    }
}

/// Which models [`Registry::list`] returns; every condition set must hold.
#[must_use]
#[derive(Debug, Clone, Default)]
pub struct Filter {
    model_type: Option<ModelType>,
    available: Option<bool>,
    metadata: Vec<(String, String)>,
    text: Option<String>,
}

impl Filter {
    /// Every model.
    pub fn new() -> Self {
        Filter::default()
    }

    /// Models of this type.
    pub fn model_type(mut self, t: ModelType) -> Self {
        self.model_type = Some(t);
        self
    }

    /// Models that are (or are not) available in the cache.
    pub fn available(mut self, available: bool) -> Self {
        self.available = Some(available);
        self
    }

    /// Models whose metadata field `key` is `value` (case-insensitive; a
    /// list matches when one of its items does; numbers and booleans
    /// compare as written).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Models whose key, name or description contains `text` (case-insensitive).
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into().to_lowercase());
        self
    }

    fn matches(&self, e: &Entry) -> bool {
        fn value_is(v: &Value, want: &str) -> bool {
            match v {
                Value::String(s) => s.eq_ignore_ascii_case(want),
                Value::Array(items) => items.iter().any(|i| value_is(i, want)),
                Value::Number(n) => n.to_string() == want,
                Value::Bool(b) => b.to_string() == want.to_ascii_lowercase(),
                _ => false,
            }
        }
        self.model_type.as_ref().is_none_or(|t| *t == e.model_type)
            && self.metadata.iter().all(|(k, v)| e.metadata.get(k).is_some_and(|x| value_is(x, v)))
            && self.text.as_ref().is_none_or(|t| {
                [&e.key, &e.name, &e.description].iter().any(|s| s.to_lowercase().contains(t.as_str()))
            })
    }
}

/// A model of the catalogue and the state of its files.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Listing {
    /// The catalogue entry.
    #[serde(flatten)]
    pub entry: Entry,
    /// Whether every file is in the cache and checks out.
    pub available: bool,
    /// Bytes of its files in the cache.
    pub size: u64,
    /// Each file's state, in catalogue order.
    pub status: Vec<FileStatus>,
}

/// What [`Registry::validate`] found.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Validation {
    /// The model's key.
    pub key: String,
    /// Whether every file is in the cache and checks out.
    pub available: bool,
    /// Each file's state, in catalogue order.
    pub files: Vec<FileStatus>,
}

/// A model loaded by [`Registry::load`].
#[non_exhaustive]
pub enum LoadedModel {
    /// A TorchScript module, managed.
    TorchScript(Managed<CModule>),
    /// A safetensors state dict, managed (read from its file when first used).
    Tensors(Managed<TensorSet>),
    /// A LoRA adapter (apply it with [`Lora::to_commit`] and [`Managed::commit`]).
    Lora(Lora),
}

impl LoadedModel {
    /// The TorchScript module, if that is what the model is.
    pub fn torchscript(&self) -> Option<&Managed<CModule>> {
        match self {
            LoadedModel::TorchScript(m) => Some(m),
            _ => None,
        }
    }

    /// The tensors, if the model is a state dict.
    pub fn tensors(&self) -> Option<&Managed<TensorSet>> {
        match self {
            LoadedModel::Tensors(m) => Some(m),
            _ => None,
        }
    }

    /// The adapter, if the model is one.
    pub fn lora(&self) -> Option<&Lora> {
        match self {
            LoadedModel::Lora(l) => Some(l),
            _ => None,
        }
    }

    /// Where a managed model's weights are now (`None` for an adapter,
    /// which is not managed).
    pub fn location(&self) -> Option<Location> {
        match self {
            LoadedModel::TorchScript(m) => Some(m.location()),
            LoadedModel::Tensors(m) => Some(m.location()),
            LoadedModel::Lora(_) => None,
        }
    }
}

impl fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadedModel::TorchScript(m) => f.debug_tuple("TorchScript").field(&m.name()).finish(),
            LoadedModel::Tensors(m) => f.debug_tuple("Tensors").field(&m.name()).finish(),
            LoadedModel::Lora(l) => f.debug_tuple("Lora").field(l).finish(),
        }
    }
}

/// A model [`Registry::load`] loaded, and where it is now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LoadedInfo {
    /// The model's key.
    pub key: String,
    /// Its type.
    pub model_type: ModelType,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Where its weights are now (`None` for an adapter).
    pub location: Option<Location>,
}

/// What the caches hold ([`Registry::cache_usage`]).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct CacheUsage {
    /// The cache folders.
    pub dirs: CacheDirs,
    /// Bytes in sire's cache, per model type folder.
    pub sire: BTreeMap<String, u64>,
    /// The hub cache's model repositories.
    pub hf: Vec<HubRepo>,
}

/// One repository of the hub cache.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct HubRepo {
    /// `org/name`.
    pub repo: String,
    /// Bytes of its blobs.
    pub size: u64,
    /// The catalogue's models with files from it (shared with the Python
    /// `huggingface_hub`).
    pub used_by: Vec<String>,
}

impl Registry {
    /// A builder; see [`RegistryBuilder`].
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// Merges a catalogue file into the registry: its entries replace those
    /// with the same keys (returned, and logged). A file that is not valid
    /// JSON is [`Error::Catalogue`] naming its line and column; an entry with
    /// a path that leaves the cache is [`Error::UnsafePath`]. Fields sire does
    /// not know are kept in [`Entry::metadata`]. On an error nothing is merged.
    pub fn add_catalogue(&mut self, path: impl AsRef<Path>) -> Result<Vec<Override>> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|e| Error::Catalogue {
            path: path.into(),
            line: 0,
            column: 0,
            reason: e.to_string(),
        })?;
        let entries = catalogue::parse(&text, path)?;
        let mut replaced = Vec::new();
        for e in entries {
            if let Some(old) = self.entries.get(&e.key) {
                let o = Override { key: e.key.clone(), previous: old.origin.clone(), now: e.origin.clone() };
                tracing::warn!(key = %o.key, previous = %o.previous.display(), now = %o.now.display(), "catalogue entry replaced");
                replaced.push(o);
            }
            self.entries.insert(e.key.clone(), e);
        }
        self.overrides.extend(replaced.iter().cloned());
        Ok(replaced)
    }

    /// Every key a later catalogue redefined, in merge order.
    pub fn overrides(&self) -> &[Override] {
        &self.overrides
    }

    /// The catalogue's entries, by key.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The entry of `key` ([`Error::NotInCatalogue`] if none).
    pub fn entry(&self, key: &str) -> Result<&Entry> {
        self.entries.get(key).ok_or_else(|| Error::NotInCatalogue {
            key: key.into(),
            known: self.entries.keys().cloned().collect(),
        })
    }

    /// The cache folders in use.
    pub fn cache_dirs(&self) -> &CacheDirs {
        &self.dirs
    }

    /// The models that pass `filter`, by key, with the state of their files
    /// (no network; hashing a file only when its sidecar is stale). A file
    /// that cannot be checked is in state [`FileState::Error`]: it makes its
    /// model unavailable, not the listing fail.
    pub fn list(&self, filter: &Filter) -> Result<Vec<Listing>> {
        let mut out = Vec::new();
        for e in self.entries.values().filter(|e| filter.matches(e)) {
            let v = self.validate_entry(e)?;
            if filter.available.is_some_and(|a| a != v.available) {
                continue;
            }
            let size = v.files.iter().filter_map(|f| f.size).sum();
            out.push(Listing { entry: e.clone(), available: v.available, size, status: v.files });
        }
        Ok(out)
    }

    /// Checks the model's files on disk against the catalogue (no network);
    /// a file that cannot be checked is in state [`FileState::Error`].
    pub fn validate(&self, key: &str) -> Result<Validation> {
        self.validate_entry(self.entry(key)?)
    }

    fn validate_entry(&self, e: &Entry) -> Result<Validation> {
        let files: Vec<FileStatus> = e.files.iter().map(|f| self.file_status(e, f)).collect();
        let available = !files.is_empty() && files.iter().all(|f| self.usable(f.state));
        Ok(Validation { key: e.key.clone(), available, files })
    }

    /// The path of the model's main (first) file, which must be in the cache
    /// and check out ([`Error::NotDownloaded`], [`Error::HashMismatch`]...
    /// otherwise). No network.
    pub fn path(&self, key: &str) -> Result<PathBuf> {
        let e = self.entry(key)?;
        let file = e
            .files
            .first()
            .ok_or_else(|| Error::InvalidEntry { key: key.into(), reason: "it has no files".into() })?;
        let status = self.check_file(e, file)?;
        if self.usable(status.state) {
            Ok(status.local.expect("a usable file has a path"))
        } else {
            Err(self.state_error(e, file, &status))
        }
    }

    /// Brings every file of the model into the cache, checked, and returns
    /// their paths in catalogue order. Files already there and valid are not
    /// fetched again (no network at all when every file is).
    ///
    /// Each file is downloaded into `<file>.incomplete` (resumed with a
    /// Range request when one is there), under a file lock, the existence
    /// check repeated once the lock is held, so that processes fetching one
    /// file download it once; it is renamed into place only once its sha256
    /// matches the catalogue's. Files from `hf://` go into Hugging Face's
    /// cache as the Python client lays it out.
    pub fn download(&self, key: &str) -> Result<Vec<PathBuf>> {
        let e = self.entry(key)?;
        if e.files.is_empty() {
            return Err(Error::InvalidEntry { key: key.into(), reason: "it has no files".into() });
        }
        e.files.iter().map(|f| self.fetch(e, f)).collect()
    }

    /// Deletes the model's files from the caches and returns the bytes
    /// freed. A hub blob is deleted only when no other snapshot links to it.
    /// Each file is reached as a download reaches it (no symlink but the
    /// snapshot link, which must point into the repository's `blobs/`:
    /// [`Error::UnsafePath`] otherwise) and deleted under its download lock.
    pub fn remove(&self, key: &str) -> Result<u64> {
        let e = self.entry(key)?;
        let mut freed = 0;
        for f in &e.files {
            let place = Place::of(&self.dirs, e, f);
            let Some(path) = place.local() else { continue };
            let cache_err = |p: &Path, source| Error::Cache { path: p.into(), source };
            match &place {
                Place::Sire { rel, .. } => {
                    let _lock = cache::FileLock::acquire(
                        &self
                            .dirs
                            .sire
                            .join(".locks")
                            .join(e.model_type.as_str())
                            .join(format!("{rel}.lock")),
                        self.lock_timeout,
                    )?;
                    if let Some(meta) = cache::inspect(key, &place, &path)? {
                        cache::forget(&self.dirs, &path);
                        fs::remove_file(&path).map_err(|e| cache_err(&path, e))?;
                        freed += meta.len();
                    }
                    let partial = PathBuf::from(format!("{}.incomplete", path.display()));
                    if fs::symlink_metadata(&partial).is_ok_and(|m| m.is_file()) {
                        let _ = fs::remove_file(&partial);
                    }
                    let _ = fs::remove_file(http::partial_sidecar(&partial));
                }
                Place::Hf { repo_dir, .. } => {
                    // Checks every folder on the way and where the link points.
                    let Some(meta) = cache::inspect(key, &place, &path)? else { continue };
                    let link = match fs::read_link(&path) {
                        Ok(l) => l,
                        Err(_) => {
                            // A regular file in the snapshot (checked by inspect).
                            fs::remove_file(&path).map_err(|e| cache_err(&path, e))?;
                            freed += meta.len();
                            continue;
                        }
                    };
                    let Some(blob_name) = link.file_name() else { continue };
                    let folder = repo_dir.file_name().map(PathBuf::from).unwrap_or_default();
                    let mut lock_name = blob_name.to_os_string();
                    lock_name.push(".lock");
                    let _lock = cache::FileLock::acquire(
                        &self.dirs.hf.join(".locks").join(&folder).join(lock_name),
                        self.lock_timeout,
                    )?;
                    fs::remove_file(&path).map_err(|e| cache_err(&path, e))?;
                    let blob = repo_dir.join("blobs").join(blob_name);
                    if !links_to(&repo_dir.join("snapshots"), blob_name) {
                        cache::forget(&self.dirs, &blob);
                        if let Ok(m) = fs::symlink_metadata(&blob) {
                            if m.is_file() {
                                freed += m.len();
                                fs::remove_file(&blob).map_err(|e| cache_err(&blob, e))?;
                            }
                        }
                    }
                }
            }
        }
        Ok(freed)
    }

    /// Loads the model by key: downloads and validates it first when needed,
    /// then a TorchScript model is a managed `CModule`, a safetensors state
    /// dict a managed [`TensorSet`] (read from the file when first guarded),
    /// an adapter a [`Lora`] (a PEFT folder when the model has an
    /// `adapter_config.json`). Managed models go to the instance given to
    /// [`RegistryBuilder::pools`], else the global one, named by their key.
    /// Loading a key again returns the same managed model (an adapter is
    /// read again).
    pub fn load(&self, key: &str) -> Result<LoadedModel> {
        match self.loaded.lock().get(key) {
            Some((Kept::TorchScript(m), _)) => return Ok(LoadedModel::TorchScript(m.clone())),
            Some((Kept::Tensors(m), _)) => return Ok(LoadedModel::Tensors(m.clone())),
            _ => {}
        }
        let e = self.entry(key)?;
        let paths = self.download(key)?;
        let pools = || self.pools.clone().map_or_else(crate::runtime::global, Ok);
        let opts = || ManageOptions::new().name(key);
        let ends = |p: &&PathBuf, ext: &str| p.extension().is_some_and(|x| x == ext);
        let (model, path) = match &e.model_type {
            ModelType::TorchScript => {
                let path = paths
                    .iter()
                    .find(|p| pickle::sniff(p).is_ok_and(|f| f == pickle::Format::TorchScript))
                    .unwrap_or(&paths[0]);
                let m = CModule::load(path)?;
                (LoadedModel::TorchScript(pools()?.manage_with(m, opts())?), path.clone())
            }
            ModelType::SafeTensors => {
                let path = paths.iter().find(|p| ends(p, "safetensors")).unwrap_or(&paths[0]);
                let set = TensorSet::from_safetensors(path)?;
                (LoadedModel::Tensors(pools()?.manage_with(set, opts())?), path.clone())
            }
            ModelType::Lora => {
                let config = paths.iter().find(|p| p.file_name().is_some_and(|n| n == "adapter_config.json"));
                match config {
                    Some(c) => {
                        let dir = c.parent().unwrap_or(Path::new("."));
                        (LoadedModel::Lora(Lora::from_peft(dir)?), dir.to_path_buf())
                    }
                    None => {
                        let path = paths.iter().find(|p| ends(p, "safetensors")).unwrap_or(&paths[0]);
                        (LoadedModel::Lora(Lora::from_safetensors(path)?), path.clone())
                    }
                }
            }
            ModelType::Other(t) => {
                return Err(Error::InvalidEntry {
                    key: key.into(),
                    reason: format!("type `{t}` cannot be loaded (torchscript, safetensors and lora can)"),
                })
            }
        };
        let mut loaded = self.loaded.lock();
        // Another thread may have loaded it meanwhile: keep the first.
        let kept = match (&model, loaded.get(key)) {
            (LoadedModel::TorchScript(_), Some((Kept::TorchScript(m), _))) => {
                return Ok(LoadedModel::TorchScript(m.clone()))
            }
            (LoadedModel::Tensors(_), Some((Kept::Tensors(m), _))) => {
                return Ok(LoadedModel::Tensors(m.clone()))
            }
            (LoadedModel::TorchScript(m), _) => Kept::TorchScript(m.clone()),
            (LoadedModel::Tensors(m), _) => Kept::Tensors(m.clone()),
            (LoadedModel::Lora(_), _) => Kept::Lora,
        };
        loaded.insert(key.to_string(), (kept, path));
        Ok(model)
    }

    /// The models [`Registry::load`] loaded, by key, and where each is now.
    pub fn loaded_models(&self) -> Vec<LoadedInfo> {
        let loaded = self.loaded.lock();
        loaded
            .iter()
            .map(|(key, (m, path))| LoadedInfo {
                key: key.clone(),
                model_type: self
                    .entries
                    .get(key)
                    .map_or(ModelType::Other("unknown".into()), |e| e.model_type.clone()),
                path: path.clone(),
                location: match m {
                    Kept::TorchScript(m) => Some(m.location()),
                    Kept::Tensors(m) => Some(m.location()),
                    Kept::Lora => None,
                },
            })
            .collect()
    }

    /// Drops the registry's reference to a loaded model (it stays managed
    /// while other handles on it live); whether it was loaded.
    pub fn unload(&self, key: &str) -> bool {
        self.loaded.lock().remove(key).is_some()
    }

    /// What the caches hold: sire's cache per type folder, and the hub
    /// cache's repositories with the catalogue's models that use each.
    pub fn cache_usage(&self) -> CacheUsage {
        let mut sire = BTreeMap::new();
        if let Ok(rd) = fs::read_dir(&self.dirs.sire) {
            for d in rd.flatten() {
                let name = d.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && d.file_type().is_ok_and(|t| t.is_dir()) {
                    sire.insert(name, cache::dir_size(&d.path()));
                }
            }
        }
        let mut hf = Vec::new();
        if let Ok(rd) = fs::read_dir(&self.dirs.hf) {
            for d in rd.flatten() {
                let name = d.file_name().to_string_lossy().into_owned();
                let Some(repo) = name.strip_prefix("models--").map(|r| r.replacen("--", "/", 1)) else {
                    continue;
                };
                let used_by = self
                    .entries
                    .values()
                    .filter(|e| {
                        e.files.iter().any(
                            |f| matches!(&f.source, Some(source::Source::Hf { repo: r, .. }) if *r == repo),
                        )
                    })
                    .map(|e| e.key.clone())
                    .collect();
                hf.push(HubRepo { size: cache::dir_size(&d.path().join("blobs")), repo, used_by });
            }
        }
        hf.sort_by(|a, b| a.repo.cmp(&b.repo));
        CacheUsage { dirs: self.dirs.clone(), sire, hf }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("models", &self.entries.keys().collect::<Vec<_>>())
            .field("cache", &self.dirs)
            .finish_non_exhaustive()
    }
}

/// Whether any link under `dir` (recursively) points at a blob of this name.
fn links_to(dir: &Path, blob: &std::ffi::OsStr) -> bool {
    let Ok(rd) = fs::read_dir(dir) else { return false };
    rd.flatten().any(|e| match e.file_type() {
        Ok(t) if t.is_symlink() => fs::read_link(e.path()).is_ok_and(|l| l.file_name() == Some(blob)),
        Ok(t) if t.is_dir() => links_to(&e.path(), blob),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn registry_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Registry>();
    }
}
