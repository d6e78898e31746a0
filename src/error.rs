//! The crate's one error type.

use std::path::PathBuf;
use std::time::Duration;

use crate::Location;

/// Everything that can go wrong in `sire`.
///
/// Variants carry the sizes, devices and paths involved so that a message is
/// actionable on its own. A failed operation never leaves a model half-moved:
/// when a move fails the model stays whole at its previous location.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model is larger than the whole budget of the pool it must go to;
    /// no amount of eviction or waiting can make room.
    #[error(
        "model `{model}` needs {} on {location} but the whole budget there is {}",
        fmt_bytes(*requested),
        fmt_bytes(*budget)
    )]
    TooLarge {
        /// Name of the model.
        model: String,
        /// The pool that cannot hold it.
        location: Location,
        /// Bytes the model needs.
        requested: u64,
        /// The pool's whole budget.
        budget: u64,
    },

    /// Room could not be made: what is missing is held by models in use (and the
    /// wait timed out or was not allowed) or cannot be evicted anywhere.
    #[error(
        "no room for model `{model}` ({}) on {location}: {} of {} in use{}",
        fmt_bytes(*requested),
        fmt_bytes(*in_use),
        fmt_bytes(*budget),
        match waited { Some(d) => format!(", gave up after waiting {d:?}"), None => String::new() }
    )]
    OutOfMemory {
        /// Name of the model.
        model: String,
        /// The pool that is full.
        location: Location,
        /// Bytes the model needs.
        requested: u64,
        /// The pool's budget.
        budget: u64,
        /// Bytes held in the pool when the call gave up.
        in_use: u64,
        /// How long the call waited for room, if it waited.
        waited: Option<Duration>,
    },

    /// A budget string (argument or environment variable) could not be parsed.
    #[error(
        "invalid budget {value:?} for {name}: {reason} (expected e.g. `6GiB`, `6000MB`, `0.8` or `80%`)"
    )]
    InvalidBudget {
        /// Where the value came from (an environment variable or builder method).
        name: String,
        /// The text that was given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A device that does not exist on this machine was named.
    #[error("unknown device {location}: this machine has {available} CUDA device(s)")]
    UnknownDevice {
        /// The location asked for.
        location: Location,
        /// How many CUDA devices exist.
        available: usize,
    },

    /// A CUDA-only operation ([`device_memory`](crate::device_memory),
    /// [`empty_cache`](crate::empty_cache), ...) was called, but libtorch sees no
    /// CUDA device: no GPU or driver, or a libtorch built without CUDA. Other
    /// failures of CUDA calls are [`Error::Torch`], with the operation's name
    /// and libtorch's message.
    #[error("no CUDA device: {what} needs one and libtorch sees none")]
    NoCuda {
        /// The operation that was asked for.
        what: &'static str,
    },

    /// The spill directory cannot be used.
    #[error("spill directory {path:?} is not usable: {source}")]
    SpillDir {
        /// The directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },

    /// A file of the disk tier (a spill file, or a safetensors file a model
    /// was loaded from) is malformed or failed its integrity check: the bytes
    /// on disk are not the ones that were written.
    #[error("{path:?} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What did not match.
        detail: String,
    },

    /// The model's tensors are not all on one device.
    #[error("model `{model}` has tensors on several devices: {devices}")]
    MixedDevices {
        /// Name of the model.
        model: String,
        /// The devices found, with one tensor name each.
        devices: String,
    },

    /// The options given to `manage_with` contradict each other or the machine.
    #[error("invalid options for model `{model}`: {reason}")]
    InvalidOptions {
        /// Name of the model.
        model: String,
        /// What is wrong.
        reason: String,
    },

    /// The operation needs an idle model, but guards on it are alive.
    #[error("model `{model}` is in use ({guards} live guard(s))")]
    InUse {
        /// Name of the model.
        model: String,
        /// Live guards.
        guards: u64,
    },

    /// The model was registered with a different `ResourcePoolManagement`.
    #[error("model `{model}` belongs to another ResourcePoolManagement instance")]
    ForeignModel {
        /// Name of the model.
        model: String,
    },

    /// A move of the model's weights panicked (libtorch raised where `tch`
    /// panics instead of returning an error). The move was undone: the model
    /// is whole at its previous location.
    #[error("moving model `{model}` panicked: {message}")]
    MovePanicked {
        /// Name of the model.
        model: String,
        /// The panic's message.
        message: String,
    },

    /// No model with this id was added to the
    /// [`SharedModelManager`](crate::SharedModelManager).
    #[error("no model `{id}` in this SharedModelManager (known: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownModel {
        /// The id asked for.
        id: String,
        /// The ids it holds.
        known: Vec<String>,
    },

    /// A model was fetched from a [`SharedModelManager`](crate::SharedModelManager)
    /// as another type than the one it was added as.
    #[error("model `{id}` is a {actual}, not a {requested}")]
    WrongModelType {
        /// The model's id.
        id: String,
        /// The type asked for (its name without module paths).
        requested: String,
        /// The type it was added as (its name without module paths).
        actual: String,
    },

    /// A commit names a tensor the model does not have.
    #[error("model `{model}` has no tensor `{name}`")]
    UnknownTensor {
        /// Name of the model.
        model: String,
        /// The tensor name that was not found.
        name: String,
    },

    /// A commit's tensor does not fit the weight it targets.
    #[error("model `{model}`: tensor `{name}` is {expected:?} but the commit gives {found:?}")]
    ShapeMismatch {
        /// Name of the model.
        model: String,
        /// The targeted tensor.
        name: String,
        /// The weight's shape.
        expected: Vec<i64>,
        /// The shape the commit would produce or replace it with.
        found: Vec<i64>,
    },

    /// A commit cannot apply to this model (wrong dtype, malformed LoRA factors...).
    #[error("invalid commit for model `{model}`: {reason}")]
    InvalidCommit {
        /// Name of the model.
        model: String,
        /// What is wrong.
        reason: String,
    },

    /// `revert_to` names a commit that is not on this handle's stack.
    #[error("model `{model}` has no commit {id} on this handle's stack")]
    UnknownCommit {
        /// Name of the model.
        model: String,
        /// The commit asked for.
        id: crate::CommitId,
    },

    /// A closure commit's apply or revert function failed while a guard brought
    /// the model to its commit stack; the model was left as it was before.
    #[error("model `{model}`: commit `{commit}` failed to {action}: {source}")]
    CommitFailed {
        /// Name of the model.
        model: String,
        /// The commit's label and id.
        commit: String,
        /// `apply` or `revert`.
        action: &'static str,
        /// The closure's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A LoRA file is malformed (a factor without its pair, an unknown key
    /// layout, a non-scalar alpha).
    #[error("LoRA {origin}: {reason}")]
    InvalidLora {
        /// The file (or `tensors` when built from tensors).
        origin: String,
        /// What is wrong, naming the key.
        reason: String,
    },

    /// A LoRA module matches no tensor of the model.
    #[error("LoRA key `{key}` matches no tensor of the model: {detail}")]
    UnmatchedKey {
        /// The module key as written in the LoRA file.
        key: String,
        /// The names tried.
        detail: String,
    },

    /// A LoRA module matches several tensors of the model, so which one it
    /// patches is ambiguous.
    #[error(
        "LoRA key `{key}` matches several tensors of the model ({}); it must match exactly one",
        backticked(candidates)
    )]
    AmbiguousKey {
        /// The module key as written in the LoRA file.
        key: String,
        /// The names of the tensors it matches.
        candidates: Vec<String>,
    },

    /// A catalogue file of the model registry cannot be read, is not valid
    /// JSON, or is not a catalogue (an entry that is not an object, a field
    /// of the wrong type).
    #[cfg(feature = "registry")]
    #[error("catalogue {path:?}{}: {reason}", if *line > 0 { format!(", line {line}, column {column}") } else { String::new() })]
    Catalogue {
        /// The catalogue file (or the origin given for a catalogue read from a string).
        path: PathBuf,
        /// Line of the error (1-based; 0 when the file could not be read).
        line: usize,
        /// Column of the error (1-based; 0 when the file could not be read).
        column: usize,
        /// What is wrong.
        reason: String,
    },

    /// A catalogue entry cannot be used: a malformed sha256, an unknown
    /// source scheme, a download that names no file, an unsupported type for
    /// the operation.
    #[cfg(feature = "registry")]
    #[error("model `{key}`: {reason}")]
    InvalidEntry {
        /// The model's key.
        key: String,
        /// What is wrong.
        reason: String,
    },

    /// The registry has no model with this key.
    #[cfg(feature = "registry")]
    #[error("no model `{key}` in the catalogue (known: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    NotInCatalogue {
        /// The key asked for.
        key: String,
        /// The keys the catalogue holds.
        known: Vec<String>,
    },

    /// A path from a catalogue would leave the cache: absolute, with a `..`
    /// component, or through a symlink found on disk.
    #[cfg(feature = "registry")]
    #[error("model `{key}`: path {path:?} is refused: {reason}")]
    UnsafePath {
        /// The model's key.
        key: String,
        /// The path as written in the catalogue (or found on disk).
        path: String,
        /// Why it is refused.
        reason: String,
    },

    /// A server answered a download with an HTTP error status that is not
    /// retried (a 4xx), or still failed after the retries (a 5xx).
    #[cfg(feature = "registry")]
    #[error("model `{key}`: {method} {url}: HTTP {status}")]
    Http {
        /// The model's key.
        key: String,
        /// `GET`, or `HEAD` for the hub's file resolution.
        method: &'static str,
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
    },

    /// A download failed after its retries: the connection was refused or
    /// cut, or the body ended before its announced length. The partial file
    /// is kept, and the next download resumes it.
    #[cfg(feature = "registry")]
    #[error("model `{key}`: downloading {url} failed after {attempts} attempt(s): {reason}")]
    Download {
        /// The model's key.
        key: String,
        /// The URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },

    /// Another process held a cache file's lock longer than the registry's
    /// lock timeout ([`crate::registry::RegistryBuilder::lock_timeout`]).
    #[cfg(feature = "registry")]
    #[error("waited {waited:?} for the lock {path:?} (another process is downloading or removing that file; if none is, it is safe to delete the lock file)")]
    LockTimeout {
        /// The lock file.
        path: std::path::PathBuf,
        /// How long this process waited.
        waited: std::time::Duration,
    },

    /// A download is larger than the registry's size limit; nothing is kept.
    #[cfg(feature = "registry")]
    #[error("model `{key}`: {url} is larger than the download limit: {} > {}", fmt_bytes(*size), fmt_bytes(*limit))]
    DownloadTooLarge {
        /// The model's key.
        key: String,
        /// The URL.
        url: String,
        /// Bytes announced or received so far.
        size: u64,
        /// The limit.
        limit: u64,
    },

    /// A file's sha256 is not the one the catalogue gives. When raised by a
    /// download, the file was not kept.
    #[cfg(feature = "registry")]
    #[error("model `{key}`: {path:?} ({} bytes) has sha256 {actual} but the catalogue says {expected}{}", size, if *removed { "; the file was not kept" } else { "" })]
    HashMismatch {
        /// The model's key.
        key: String,
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The sha256 the catalogue gives.
        expected: String,
        /// The sha256 of the bytes found.
        actual: String,
        /// Whether the file was deleted (a download that failed its check).
        removed: bool,
    },

    /// A catalogue file has no sha256 and unhashed files were not allowed.
    #[cfg(feature = "registry")]
    #[error("model `{key}`: file `{file}` has no sha256 in the catalogue; it is used only when unhashed files are allowed explicitly")]
    Unhashed {
        /// The model's key.
        key: String,
        /// The file's path in the catalogue.
        file: String,
    },

    /// A weight file is a Python pickle (a raw pickle, or a zip archive of
    /// pickles written by `torch.save`), which can run code when loaded.
    #[cfg(feature = "registry")]
    #[error("model `{key}`: {path:?} is {what}; pickles can run code when loaded and are refused unless allowed explicitly")]
    Pickle {
        /// The model's key.
        key: String,
        /// The file.
        path: PathBuf,
        /// What kind of pickle was found.
        what: String,
    },

    /// A model's file is not in the cache (not downloaded yet, or removed).
    #[cfg(feature = "registry")]
    #[error("model `{key}` is not downloaded: file `{file}` is not in the cache{}", path.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
    NotDownloaded {
        /// The model's key.
        key: String,
        /// The file's path in the catalogue.
        file: String,
        /// Where it would be, when known.
        path: Option<PathBuf>,
    },

    /// A cache directory or file cannot be created, written or read.
    #[cfg(feature = "registry")]
    #[error("cache {path:?}: {source}")]
    Cache {
        /// The directory or file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },

    /// A task of a [`Pool`](crate::pool::Pool) returned an error (on its last
    /// attempt). The task's own error is the source.
    #[cfg(feature = "pool")]
    #[error("task `{task}` failed on device #{slot} ({device}) after {attempts} attempt(s): {source}")]
    TaskFailed {
        /// The task's key.
        task: String,
        /// The device it ran on.
        device: Location,
        /// The device's position in the pool's device list.
        slot: usize,
        /// Attempts made.
        attempts: u32,
        /// The error the task returned.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A task of a [`Pool`](crate::pool::Pool) panicked (on its last attempt).
    /// The panic was caught; the other tasks went on.
    #[cfg(feature = "pool")]
    #[error(
        "task `{task}` panicked on device #{slot} ({device}) after {attempts} attempt(s){}: {message}",
        at(panicked_at)
    )]
    TaskPanicked {
        /// The task's key.
        task: String,
        /// The device it ran on.
        device: Location,
        /// The device's position in the pool's device list.
        slot: usize,
        /// Attempts made.
        attempts: u32,
        /// The panic's message.
        message: String,
        /// Where it panicked (`file:line:column`).
        panicked_at: Option<String>,
        /// The stack where it panicked (printed with `{}`; not part of the message).
        backtrace: Option<Box<std::backtrace::Backtrace>>,
    },

    /// A worker thread of a [`Pool`](crate::pool::Pool) died (panicked outside
    /// the task's function, for instance in a task's `Drop`); the task it was
    /// running, if any, is reported with this error and the other workers go on.
    #[cfg(feature = "pool")]
    #[error(
        "worker {worker} of device #{slot} ({device}) died{}{}: {message}",
        match task { Some(t) => format!(" while running task `{t}`"), None => String::new() },
        at(panicked_at)
    )]
    WorkerDied {
        /// The task it was running, if any.
        task: Option<String>,
        /// The worker's device.
        device: Location,
        /// The device's position in the pool's device list.
        slot: usize,
        /// The worker's number on its device.
        worker: usize,
        /// The panic's message.
        message: String,
        /// Where it panicked (`file:line:column`).
        panicked_at: Option<String>,
    },

    /// The init function of a [`Pool`](crate::pool::Pool) failed (or panicked)
    /// for one device; the pool works without that device.
    #[cfg(feature = "pool")]
    #[error("init failed for device #{slot} ({device}): {message}")]
    DeviceInit {
        /// The device.
        device: Location,
        /// The device's position in the pool's device list.
        slot: usize,
        /// The init function's error or panic message (with its location).
        message: String,
    },

    /// A [`Pool`](crate::pool::Pool) has no device to run on: every device's
    /// init failed.
    #[cfg(feature = "pool")]
    #[error("no device of the pool works: init failed on all {devices} device(s): {}", reasons.join("; "))]
    NoWorkingDevice {
        /// Devices the pool was asked to use.
        devices: usize,
        /// Each device's init failure.
        reasons: Vec<String>,
    },

    /// Every worker of a [`Pool`](crate::pool::Pool) died before the tasks
    /// were done; the finished tasks were reported.
    #[cfg(feature = "pool")]
    #[error(
        "every worker of the pool died ({workers} worker(s)): {finished} of {tasks} task(s) reported, {} never run; {}",
        tasks - finished,
        reasons.join("; ")
    )]
    WorkersDied {
        /// Workers the pool started.
        workers: usize,
        /// Tasks in the run.
        tasks: usize,
        /// Tasks with an outcome.
        finished: usize,
        /// How each worker died.
        reasons: Vec<String>,
    },

    /// The [`Pool`](crate::pool::Pool) was shut down (before or during the call).
    #[cfg(feature = "pool")]
    #[error("the task pool is shut down{}", if *tasks > 0 { format!(": {finished} of {tasks} task(s) reported, the rest never run") } else { String::new() })]
    PoolShutDown {
        /// Tasks in the interrupted run (0 when the call came after the shutdown).
        tasks: usize,
        /// Tasks with an outcome.
        finished: usize,
    },

    /// A rank and world size (given, or read from `RANK`/`WORLD_SIZE` or
    /// `SLURM_PROCID`/`SLURM_NTASKS`) do not describe a rank of a world.
    #[cfg(feature = "pool")]
    #[error("invalid rank ({origin}): {reason}")]
    InvalidRank {
        /// Where the values came from.
        origin: String,
        /// What is wrong.
        reason: String,
    },

    /// Two tasks share a key; keys name shards and completion records, so
    /// they must be unique.
    #[cfg(feature = "pool")]
    #[error("tasks #{first} and #{second} share the key `{key}`: task keys must be unique")]
    DuplicateTask {
        /// The key.
        key: String,
        /// Position of the first task with it.
        first: usize,
        /// Position of the second.
        second: usize,
    },

    /// A completion record (or its directory) could not be read or written.
    #[cfg(feature = "pool")]
    #[error("completion record {path:?}{}: {source}", match task { Some(t) => format!(" of task `{t}`"), None => String::new() })]
    Record {
        /// The task, for a record being written.
        task: Option<String>,
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },

    /// A failure inside libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// An I/O failure.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),

    /// An I/O failure on a file of the disk tier (a spill file or a model's
    /// source file), naming the model and the file.
    #[error("model `{model}`: {path:?}: {source}")]
    File {
        /// Name of the model.
        model: String,
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The message of a caught panic (`panic!` with a literal or a formatted string).
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// ` at file:line:col` for a panic location, or nothing.
#[cfg(feature = "pool")]
fn at(location: &Option<String>) -> String {
    location.as_deref().map(|l| format!(" at {l}")).unwrap_or_default()
}

/// `a`, `b`, `c`: names in backticks, comma-separated.
fn backticked(names: &[String]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// Formats a byte count for humans (`1.50 GiB`).
pub(crate) fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A type's name without its module path, generics dropped:
/// `my_crate::module::Detector<X>` -> `Detector`.
pub(crate) fn short_type_name(full: &str) -> &str {
    let path = full.split('<').next().unwrap_or(full);
    path.rsplit("::").next().unwrap_or(path)
}

/// A type's name with every module path dropped, generics kept:
/// `a::Wrap<b::Inner, c::D>` -> `Wrap<Inner, D>`.
pub(crate) fn short_type(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    let mut segment = String::new();
    for ch in full.chars() {
        if ch.is_alphanumeric() || ch == '_' || ch == ':' {
            segment.push(ch);
        } else {
            out.push_str(segment.rsplit("::").next().unwrap_or(&segment));
            segment.clear();
            out.push(ch);
        }
    }
    out.push_str(segment.rsplit("::").next().unwrap_or(&segment));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_type_names() {
        assert_eq!(short_type_name("sire::user::TensorSet"), "TensorSet");
        assert_eq!(short_type_name("Net"), "Net");
        assert_eq!(short_type_name("a::Wrap<b::Inner>"), "Wrap");
        assert_eq!(short_type("tch::wrappers::jit::CModule"), "CModule");
        assert_eq!(short_type("a::Wrap<b::Inner, c::D>"), "Wrap<Inner, D>");
        assert_eq!(short_type("std::sync::Mutex<x::Net>"), "Mutex<Net>");
    }
}
