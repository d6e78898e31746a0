//! `ResourcePoolManagement`: the public handle on the engine, its builder, and
//! the global instance behind the free functions.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::engine::{Engine, Pinning};
use crate::error::fmt_bytes;
use crate::events::Listener;
use crate::tier::budget;
use crate::tier::spill::PrivateDir;
use crate::{Error, Event, Location, ManageOptions, Managed, ResourceUser, Result, Stats};

/// Owns the pools, the managed models, their LRU order and the statistics.
///
/// Cheap to clone (a reference-counted handle). One global instance backs the
/// free functions ([`setup_default_pools`], [`manage`](crate::manage), [`stats`]);
/// tests and embedders can build independent instances with
/// [`ResourcePoolManagement::builder`].
///
/// ```
/// # fn main() -> sire::Result<()> {
/// let dir = tempfile::tempdir()?;
/// let pools = sire::ResourcePoolManagement::builder()
///     .cuda(false)
///     .cpu_budget(64 << 20)
///     .spill_dir(dir.path())
///     .build()?;
/// let m = pools.manage(sire::TensorSet::new([("w", tch::Tensor::ones([1024], tch::kind::FLOAT_CPU))])?)?;
/// let g = sire::auto_manage(&m)?;
/// assert_eq!(g.device(), tch::Device::Cpu);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ResourcePoolManagement {
    pub(crate) inner: Arc<Engine>,
    /// The private spill folder and its lock, held while any handle lives
    /// (dropped after the engine, which removes the folder).
    _spill: Option<Arc<PrivateDir>>,
}

impl ResourcePoolManagement {
    /// A builder that detects the machine; every detected value can be overridden.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Registers a model with default options. Nothing moves, unless host memory
    /// is over budget: then idle models (least recently used first), or this
    /// one, are spilled to disk.
    pub fn manage<T: ResourceUser>(&self, model: T) -> Result<Managed<T>> {
        self.manage_with(model, ManageOptions::default())
    }

    /// Registers a model with options.
    pub fn manage_with<T: ResourceUser>(&self, model: T, opts: ManageOptions) -> Result<Managed<T>> {
        let core = self.inner.register(&model, opts)?;
        Ok(Managed::new(model, core, self.clone()))
    }

    /// A snapshot of pools, residents and counters.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// The pools and their budgets.
    pub fn pools(&self) -> Vec<(Location, u64)> {
        self.inner.pools()
    }

    /// The folder this instance spills to: a private subfolder of the
    /// configured spill directory (absolute, `sire-<32 random hex digits>`,
    /// mode 0700, files 0600), removed when the instance is dropped, or by the
    /// next set-up under the same directory if the process died.
    pub fn spill_dir(&self) -> Option<&std::path::Path> {
        self.inner.spill_dir.as_deref()
    }

    /// Checks the ledger's invariants now, under the engine's lock: every
    /// pool's `used` is the sum of its residents' charges (plus cached host
    /// buffers) and within its budget, pinned bytes add up and stay within
    /// their cap. Debug builds check them after every transition anyway; this
    /// lets tests (the stress suite) check them at any instant, in release
    /// builds too. Returns the first broken invariant. For tests: not part of
    /// the stable API.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.inner.verify()
    }
}

impl fmt::Debug for ResourcePoolManagement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourcePoolManagement").field("pools", &self.pools()).finish_non_exhaustive()
    }
}

impl fmt::Display for ResourcePoolManagement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pools: Vec<String> = self.pools().iter().map(|(l, b)| format!("{l} {}", fmt_bytes(*b))).collect();
        write!(f, "pools: {}", pools.join(", "))?;
        if let Some(d) = self.spill_dir() {
            write!(f, " (spill dir {})", d.display())?;
        }
        Ok(())
    }
}

/// Configures a [`ResourcePoolManagement`].
///
/// Each budget comes, in order of precedence, from the builder, from the
/// environment (when [`Builder::env`] is on, the default), or from the machine:
///
/// | pool | builder | environment | default |
/// |---|---|---|---|
/// | each CUDA device | [`cuda_budget`](Builder::cuda_budget) | `SIRE_CUDA_BUDGET` | NVML total − max(1 GiB, 10%) |
/// | host memory | [`cpu_budget`](Builder::cpu_budget) | `SIRE_CPU_BUDGET` | available (cgroup-aware) − max(512 MiB, 10%) |
/// | disk | [`disk_budget`](Builder::disk_budget) | `SIRE_DISK_BUDGET` | free space − max(1 GiB, 5%) |
/// | spill directory (see below) | [`spill_dir`](Builder::spill_dir) | `SIRE_SPILL_DIR` | `$TMPDIR/sire` |
/// | pinned home copies | [`pinned_cap`](Builder::pinned_cap) | `SIRE_PINNED_CAP` | half the host budget |
///
/// The home copies (host weights) of models that run on a CUDA device are
/// kept in page-locked ("pinned") memory, which the GPU copies from at full
/// bandwidth and asynchronously, up to the pinned cap; beyond it they are
/// pageable (correct, slower to load). Pinned memory cannot be swapped out, so
/// the cap protects the rest of the system. Pinned bytes are part of the host
/// pool, not in addition to it. Without a CUDA device nothing is pinned.
///
/// The spill directory is a root: each instance spills into its own private
/// folder in it, `sire-<32 random hex digits>`, created 0700 by `mkdir` and
/// checked (a directory of this user, no symlink), whoever owns the root. A
/// relative path is made absolute once, at [`build`](Builder::build). Spill
/// files are created 0600 with `O_EXCL | O_NOFOLLOW`, and each carries the
/// identity of its model and write, checked when read back. Each instance
/// holds a lock in its folder for its whole life; [`build`](Builder::build)
/// removes the folders of dead instances of the same user under the root.
///
/// Environment budgets accept `6GiB`, `6000MB`, plain bytes, or a fraction
/// (`0.8`, `80%`) of the device total, available host memory or free disk.
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    cuda: bool,
    cuda_budget: Option<u64>,
    cpu_budget: Option<u64>,
    disk_budget: Option<u64>,
    pinned_cap: Option<u64>,
    spill_dir: Option<PathBuf>,
    disk: bool,
    env: bool,
    wait_timeout: Duration,
    listener: Option<Listener>,
    map_files: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            cuda: true,
            cuda_budget: None,
            cpu_budget: None,
            disk_budget: None,
            pinned_cap: None,
            spill_dir: None,
            disk: true,
            env: true,
            wait_timeout: Duration::from_secs(60),
            listener: None,
            map_files: true,
        }
    }
}

impl Builder {
    /// Whether to use CUDA devices (default: every device libtorch sees).
    pub fn cuda(mut self, on: bool) -> Self {
        self.cuda = on;
        self
    }

    /// Budget in bytes for every CUDA device.
    pub fn cuda_budget(mut self, bytes: u64) -> Self {
        self.cuda_budget = Some(bytes);
        self
    }

    /// Budget in bytes for host memory.
    pub fn cpu_budget(mut self, bytes: u64) -> Self {
        self.cpu_budget = Some(bytes);
        self
    }

    /// Budget in bytes for the spill directory.
    pub fn disk_budget(mut self, bytes: u64) -> Self {
        self.disk_budget = Some(bytes);
        self
    }

    /// At most this many bytes of home copies in pinned host memory (see the
    /// table above; 0 turns pinning off).
    pub fn pinned_cap(mut self, bytes: u64) -> Self {
        self.pinned_cap = Some(bytes);
        self
    }

    /// The spill directory: the root under which this instance makes its
    /// private folder (created 0700 if missing; must be writable; a relative
    /// path is resolved against the working directory at [`build`](Builder::build)).
    pub fn spill_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.spill_dir = Some(dir.into());
        self
    }

    /// Whether to have a disk tier at all (default on).
    pub fn disk(mut self, on: bool) -> Self {
        self.disk = on;
        self
    }

    /// Whether to read the `SIRE_*` environment variables (default on).
    pub fn env(mut self, on: bool) -> Self {
        self.env = on;
        self
    }

    /// How long [`auto_manage`](crate::auto_manage) waits for room held by
    /// models in use before it fails (default 60 s).
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// Whether CPU models are loaded from their files by mapping them
    /// (default on).
    ///
    /// A model that runs on the CPU and is loaded from a file (the
    /// safetensors file of [`TensorSet::from_safetensors`](crate::TensorSet::from_safetensors),
    /// or its spill file) then points its tensors into a private,
    /// copy-on-write mapping of the file, after the file's checks: nothing is
    /// copied, and the pages come from the page cache. Its bytes are charged to
    /// the host pool as if copied. A write to a weight copies only the pages
    /// it writes (and marks the model dirty as any write does); offloading a
    /// clean mapped model drops the mapping. A spill file's tensors are
    /// checked against their checksums the first time it is mapped after each
    /// write, and again only if its stamp (device, inode, size, modification
    /// and change times) changes. A source file is known by its stamp from its
    /// first (mapped) read on: any change to it is refused as
    /// [`Error::Corrupt`](crate::Error::Corrupt). A file whose tensors are not
    /// aligned for their kinds is copied.
    ///
    /// Off, every load copies the file into fresh memory. A mapped file must
    /// not be truncated by another process while mapped (as with any
    /// mapping, that kills the process with `SIGBUS`), nor written in place
    /// (the resident weights would change under the model until its next
    /// load, which refuses the file as corrupt); replacing it (a new file
    /// renamed over it) is safe. Where other processes may write the files in
    /// place (a shared folder), turn mapping off. `tests/faults.rs` shows
    /// both cases.
    pub fn map_files(mut self, on: bool) -> Self {
        self.map_files = on;
        self
    }

    /// A callback for every published move (an observer: metrics, logs, test
    /// invariants). It is called once per [`Event`], in publication order, after
    /// the engine's lock is released, on the thread that made the move or one
    /// that delivers for it; it must be cheap, and a panic in it is caught and
    /// logged. Guards on resident models produce no events.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// # fn main() -> sire::Result<()> {
    /// let dir = tempfile::tempdir()?;
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// let pools = sire::ResourcePoolManagement::builder()
    ///     .cuda(false)
    ///     .env(false)
    ///     .spill_dir(dir.path())
    ///     .listener(move |e: &sire::Event| log.lock().unwrap().push(e.to_string()))
    ///     .build()?;
    /// let m = pools.manage_with(
    ///     sire::TensorSet::new([("w", tch::Tensor::ones([4], tch::kind::FLOAT_CPU))])?,
    ///     sire::ManageOptions::new().name("m"),
    /// )?;
    /// m.offload()?;
    /// drop(sire::auto_manage(&m)?);
    /// assert_eq!(*seen.lock().unwrap(), ["m Registered: - -> cpu", "m Offloaded: cpu -> disk", "m Loaded: disk -> cpu"]);
    /// # Ok(()) }
    /// ```
    pub fn listener(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.listener = Some(Listener(Arc::new(f)));
        self
    }

    /// Detects the machine, applies overrides, and creates the pools.
    pub fn build(self) -> Result<ResourcePoolManagement> {
        let mut pools = Vec::new();
        if self.cuda {
            let n = if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 };
            if n > 0 {
                let totals = budget::nvml_totals(n);
                for i in 0..n {
                    let total = totals.as_ref().ok().and_then(|t| t.get(i).copied());
                    let b = match (self.cuda_budget, self.env_budget("SIRE_CUDA_BUDGET", total)?, total) {
                        (Some(b), _, _) | (None, Some(b), _) => b,
                        (None, None, Some(t)) => budget::default_cuda_budget(t),
                        (None, None, None) => {
                            return Err(Error::InvalidBudget {
                                name: "SIRE_CUDA_BUDGET".into(),
                                value: String::new(),
                                reason: format!(
                                    "the memory of cuda:{i} cannot be read ({}); set a budget",
                                    totals.as_ref().err().cloned().unwrap_or_default()
                                ),
                            })
                        }
                    };
                    pools.push((Location::Cuda(i), b));
                }
            }
        }
        let avail = budget::host_available();
        let cpu = match (self.cpu_budget, self.env_budget("SIRE_CPU_BUDGET", Some(avail))?) {
            (Some(b), _) | (None, Some(b)) => b,
            (None, None) => budget::default_cpu_budget(avail),
        };
        pools.push((Location::Cpu, cpu));
        let any_cuda = pools.iter().any(|(l, _)| matches!(l, Location::Cuda(_)));
        let pinned_cap = match (self.pinned_cap, self.env_budget("SIRE_PINNED_CAP", Some(cpu))?) {
            (Some(b), _) | (None, Some(b)) => b,
            (None, None) => cpu / 2,
        }
        .min(cpu);
        let pinning = if any_cuda { Pinning::Cuda } else { Pinning::Off };
        let mut spill = None;
        if self.disk {
            let root = match (&self.spill_dir, self.env.then(|| std::env::var_os("SIRE_SPILL_DIR")).flatten())
            {
                (Some(d), _) => d.clone(),
                (None, Some(d)) if !d.is_empty() => PathBuf::from(d),
                _ => std::env::temp_dir().join("sire"),
            };
            let private = PrivateDir::create(&root)?;
            let dir = private.path().to_path_buf();
            let free =
                budget::disk_free(&dir).map_err(|e| Error::SpillDir { path: dir.clone(), source: e })?;
            let disk = match (self.disk_budget, self.env_budget("SIRE_DISK_BUDGET", Some(free))?) {
                (Some(b), _) | (None, Some(b)) => b,
                (None, None) => budget::default_disk_budget(free),
            };
            pools.push((Location::Disk, disk));
            spill = Some(private);
        }
        let dir = spill.as_ref().map(|p| p.path().to_path_buf());
        let mut inner = Engine::new(pools, dir, self.wait_timeout).with_pinning(pinning, pinned_cap);
        inner.listener = self.listener;
        inner.transfer.map_files = self.map_files;
        if any_cuda {
            inner = inner.with_cuda_probe(
                Arc::new(|i| {
                    let (free, _) = crate::tier::cuda::mem_get_info(i).ok()?;
                    let a = crate::tier::cuda::allocator_stats(i).ok()?;
                    Some((free, a.reserved.saturating_sub(a.allocated)))
                }),
                crate::engine::CUDA_HEADROOM,
                Arc::new(|| {
                    if let Err(e) = crate::tier::cuda::empty_cache() {
                        tracing::warn!(error = %e, "could not release the CUDA allocator's cache");
                    }
                }),
            );
        }
        Ok(ResourcePoolManagement { inner: Arc::new(inner), _spill: spill.map(Arc::new) })
    }

    fn env_budget(&self, var: &str, total: Option<u64>) -> Result<Option<u64>> {
        if self.env {
            budget::budget_from_env(var, total)
        } else {
            Ok(None)
        }
    }
}

static GLOBAL: OnceLock<ResourcePoolManagement> = OnceLock::new();
static SETUP: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Sets up the global instance from the machine and the `SIRE_*` environment
/// variables (see [`Builder`]) and returns it. Calling it again is harmless: it
/// returns the existing instance and logs what it holds.
///
/// The other free functions call this on first use, so calling it is optional;
/// calling it first surfaces configuration errors (a malformed `SIRE_CUDA_BUDGET`,
/// an unwritable `SIRE_SPILL_DIR`) at a predictable place.
pub fn setup_default_pools() -> Result<ResourcePoolManagement> {
    if let Some(g) = GLOBAL.get() {
        tracing::info!("sire already set up: {g}");
        return Ok(g.clone());
    }
    let _lock = SETUP.lock();
    if let Some(g) = GLOBAL.get() {
        return Ok(g.clone());
    }
    let pools = Builder::default().build()?;
    tracing::info!("sire set up: {pools}");
    Ok(GLOBAL.get_or_init(|| pools).clone())
}

/// The global instance, set up on first use.
pub(crate) fn global() -> Result<ResourcePoolManagement> {
    match GLOBAL.get() {
        Some(g) => Ok(g.clone()),
        None => setup_default_pools(),
    }
}

/// A snapshot of the global instance (set up on first use).
pub fn stats() -> Result<Stats> {
    Ok(global()?.stats())
}
