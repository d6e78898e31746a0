//! The task pool (`pool` feature): one function over many tasks on every
//! device at once, each device's models loaded once by an init function,
//! workers pulling from one shared queue, one outcome per task in task order
//! with the full error (a panic's message and location), and, across
//! processes, contiguous shards per rank with completion records so that a
//! rerun resumes.
//!
//! ```
//! use sire::pool::{Pool, Rank, Tasks};
//! use sire::Location;
//!
//! let dir = tempfile::tempdir()?;
//! let pool = Pool::builder().devices([Location::Cpu; 2]).progress(false).build(|_device| Ok::<_, String>(2))?;
//! let words = ["alpha", "beta", "gamma", "delta"];
//! let tasks = Tasks::keyed(words, |w| w.to_string())?   // keyed by the word
//!     .shard(Rank::from_env()?)                          // this process's share
//!     .resume(dir.path())?;                              // minus what a run finished
//! let outcomes = pool.execute(tasks, |w, _device, k| Ok::<_, String>(w.len() * k))?;
//! assert!(outcomes.iter().all(|o| o.result.is_ok()));
//! // Run again: every task has its completion record, nothing is left.
//! assert!(Tasks::keyed(words, |w| w.to_string())?.resume(dir.path())?.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layout: this file is the pool (build, run, shut down); `tasks.rs` the task
//! list and its order, `shard.rs` ranks, `record.rs` completion records,
//! `panics.rs` the panic capture on the pool's threads.

mod panics;
mod record;
mod shard;
mod tasks;

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::io::IsTerminal;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::{Mutex, RwLock};
use tch::Device;

pub use shard::Rank;
pub use tasks::Tasks;

use crate::{BoxError, Error, Location, Result};
use record::Records;

thread_local! {
    /// Set on the pool's worker threads (a shutdown from a task must not wait for itself).
    static ON_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Runs a function over many tasks on several devices, each device with its
/// own models, loaded once.
///
/// Built by [`Pool::builder`]: the init function runs once per device (in
/// parallel) and returns that device's models; a device whose init fails or
/// panics is reported ([`Pool::init_failures`]) and left out. Each
/// [`execute`](Pool::execute) starts the workers (`workers_per_device` per
/// device), which pull tasks from one shared queue until it is empty, and
/// returns one [`Outcome`] per task, in task order.
///
/// The models may be managed ([`Managed`](crate::Managed)): the pool then
/// shares each device's budget with every other user of the same
/// [`ResourcePoolManagement`](crate::ResourcePoolManagement).
///
/// ```
/// use sire::pool::Pool;
/// use sire::Location;
///
/// // Two CPU "devices", each with its own model: here, a scale factor.
/// let pool = Pool::builder()
///     .devices([Location::Cpu, Location::Cpu])
///     .progress(false)
///     .build(|_device| Ok::<_, std::io::Error>(10))?;
/// let outcomes = pool.execute((1..=4).collect::<Vec<i32>>(), |task, _device, scale| {
///     if *task == 3 { Err(format!("task {task} is unlucky")) } else { Ok(task * scale) }
/// })?;
/// assert_eq!(outcomes.len(), 4);
/// assert_eq!(*outcomes[1].result.as_ref().unwrap(), 20);
/// let e = outcomes[2].result.as_ref().unwrap_err();
/// assert!(e.to_string().contains("task `2` failed"), "{e}");
/// pool.shutdown(); // frees the models (also on drop)
/// assert!(pool.execute(vec![1], |t, _, s| Ok::<_, String>(t * s)).is_err());
/// # Ok::<(), sire::Error>(())
/// ```
pub struct Pool<M> {
    /// The working devices and their models; `None` after the shutdown.
    slots: RwLock<Option<Vec<Slot<M>>>>,
    failures: Vec<Error>,
    requested: usize,
    config: PoolBuilder,
    closing: AtomicBool,
}

/// One working device of the pool.
struct Slot<M> {
    slot: usize,
    location: Location,
    device: Device,
    models: M,
}

impl<M> fmt::Debug for Pool<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("devices", &self.devices())
            .field("init_failures", &self.failures.len())
            .field("workers_per_device", &self.config.workers)
            .field("shut_down", &self.slots.read().is_none())
            .finish()
    }
}

/// Configuration of a [`Pool`]; [`build`](PoolBuilder::build) runs the init
/// function on every device.
///
/// ```
/// let pool = sire::pool::Pool::builder()
///     .devices([sire::Location::Cpu])
///     .workers_per_device(2)
///     .retries(1)
///     .description("embedding")
///     .progress(false)
///     .build(|device| Ok::<_, String>(format!("model on {device:?}")))?;
/// assert_eq!(pool.devices(), [sire::Location::Cpu]);
/// # Ok::<(), sire::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct PoolBuilder {
    devices: Option<Vec<Location>>,
    workers: usize,
    retries: u32,
    progress: bool,
    description: String,
}

/// The result of one task: which task, where it ran, how many attempts, how
/// long, and its value or its full error.
///
/// The error of a task is [`Error::TaskFailed`] (the function returned an
/// error: it is the source), [`Error::TaskPanicked`] (message, location and
/// backtrace), [`Error::WorkerDied`] (the worker
/// died outside the function while running it) or [`Error::Record`] (it
/// succeeded but its completion record could not be written).
///
/// ```
/// let pool = sire::pool::Pool::builder().devices([sire::Location::Cpu]).build(|_| Ok::<_, String>(()))?;
/// let o = pool.execute(vec![7u8], |t, _, _| Ok::<_, String>(t * 2))?.remove(0);
/// assert_eq!((o.index, o.key.as_str(), o.device, o.slot, o.attempts), (0, "0", sire::Location::Cpu, 0, 1));
/// assert_eq!(o.result?, 14);
/// # Ok::<(), sire::Error>(())
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct Outcome<R> {
    /// Position of the task in the task list that was run (after any shard or resume).
    pub index: usize,
    /// The task's key (its position for a plain `Vec`, see [`Tasks`]).
    pub key: String,
    /// The device it ran on.
    pub device: Location,
    /// The device's position in the pool's device list.
    pub slot: usize,
    /// Attempts made (1 plus the retries used).
    pub attempts: u32,
    /// Time from the first attempt's start to the last one's end.
    pub duration: Duration,
    /// The function's value, or the error of the last attempt.
    pub result: Result<R>,
}

impl Default for PoolBuilder {
    fn default() -> Self {
        PoolBuilder { devices: None, workers: 1, retries: 0, progress: true, description: "tasks".into() }
    }
}

impl PoolBuilder {
    /// The devices to use, in order; the same location may appear several
    /// times (each entry is its own slot with its own models). Default: every
    /// CUDA device, else the CPU once. A CUDA device the machine does not have,
    /// or [`Location::Disk`], is an init failure of its slot.
    ///
    /// ```
    /// # use sire::Location;
    /// let b = sire::pool::Pool::builder().devices([Location::Cpu, Location::Cpu]);
    /// # let _ = b;
    /// ```
    pub fn devices(mut self, devices: impl IntoIterator<Item = Location>) -> Self {
        self.devices = Some(devices.into_iter().collect());
        self
    }

    /// Worker threads per device, sharing its models (default 1, at least 1).
    ///
    /// ```
    /// let b = sire::pool::Pool::builder().workers_per_device(2);
    /// # let _ = b;
    /// ```
    pub fn workers_per_device(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// How many times a failed or panicking task is tried again, at once, on
    /// the same worker (default 0).
    ///
    /// ```
    /// let b = sire::pool::Pool::builder().retries(2);
    /// # let _ = b;
    /// ```
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// Whether to draw a progress bar on stderr (default on; never drawn when
    /// stderr is not a terminal).
    ///
    /// ```
    /// let b = sire::pool::Pool::builder().progress(false);
    /// # let _ = b;
    /// ```
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// The progress bar's description (default `tasks`).
    ///
    /// ```
    /// let b = sire::pool::Pool::builder().description("captioning");
    /// # let _ = b;
    /// ```
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Runs `init` once per device, each on its own thread, and builds the
    /// pool over the devices where it succeeded. A device whose init returns
    /// an error or panics is an [`Error::DeviceInit`] in
    /// [`Pool::init_failures`] (and a `tracing` error); if every device failed,
    /// the pool is still built and [`Pool::execute`] returns
    /// [`Error::NoWorkingDevice`].
    ///
    /// ```
    /// use sire::pool::Pool;
    /// use sire::Location;
    ///
    /// let pool = Pool::builder()
    ///     .devices([Location::Cpu, Location::Cuda(99)])
    ///     .build(|device| Ok::<_, String>(tch::Tensor::from(2.0f32).to_device(device)))?;
    /// assert_eq!(pool.devices(), [Location::Cpu]);
    /// let e = pool.init_failures()[0].to_string();
    /// assert!(e.contains("device #1 (cuda:99)"), "{e}");
    /// # Ok::<(), sire::Error>(())
    /// ```
    pub fn build<M, E, F>(self, init: F) -> Result<Pool<M>>
    where
        M: Send,
        E: Into<BoxError>,
        F: Fn(Device) -> std::result::Result<M, E> + Sync,
    {
        let locations = self.devices.clone().unwrap_or_else(default_devices);
        let _hook = panics::install();
        let cuda = crate::tier::cuda::device_count();
        let init = &init;
        let results: Vec<std::result::Result<Slot<M>, String>> = thread::scope(|s| {
            let handles: Vec<_> = locations
                .iter()
                .enumerate()
                .map(|(slot, &location)| {
                    thread::Builder::new().name(format!("sire-pool-init-{slot}")).spawn_scoped(s, move || {
                        let device = match location {
                            Location::Disk => {
                                return Err("the disk holds weights but computes nothing".into())
                            }
                            Location::Cuda(i) if i >= cuda => {
                                return Err(format!("this machine has {cuda} CUDA device(s)"));
                            }
                            Location::Cuda(i) => Device::Cuda(i),
                            Location::Cpu => Device::Cpu,
                        };
                        panics::capture_this_thread();
                        match catch_unwind(AssertUnwindSafe(|| init(device))) {
                            Ok(Ok(models)) => Ok(Slot { slot, location, device, models }),
                            Ok(Err(e)) => Err(chain(&*e.into())),
                            Err(payload) => {
                                Err(format!("panicked: {}", panics::take(Some(&*payload)).describe()))
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| Err("the init thread died".into())),
                    Err(e) => Err(format!("cannot start the init thread: {e}")),
                })
                .collect()
        });
        let mut slots = Vec::new();
        let mut failures = Vec::new();
        for (slot, r) in results.into_iter().enumerate() {
            match r {
                Ok(s) => {
                    tracing::info!(target: "sire::pool", slot, device = %s.location, "device ready");
                    slots.push(s)
                }
                Err(message) => {
                    let e = Error::DeviceInit { device: locations[slot], slot, message };
                    tracing::error!(target: "sire::pool", slot, device = %locations[slot], error = %e, "device left out");
                    failures.push(e);
                }
            }
        }
        Ok(Pool {
            slots: RwLock::new(Some(slots)),
            failures,
            requested: locations.len(),
            config: self,
            closing: AtomicBool::new(false),
        })
    }
}

/// Every CUDA device, else the CPU.
fn default_devices() -> Vec<Location> {
    match crate::tier::cuda::device_count() {
        0 => vec![Location::Cpu],
        n => (0..n).map(Location::Cuda).collect(),
    }
}

/// An error with its sources: `outer: inner: innermost`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Pool<()> {
    /// A builder with the defaults: every CUDA device (else the CPU), one
    /// worker per device, no retries, a progress bar when stderr is a terminal.
    ///
    /// ```
    /// let pool = sire::pool::Pool::builder().build(|_device| Ok::<_, String>(()))?;
    /// assert!(!pool.devices().is_empty());
    /// # Ok::<(), sire::Error>(())
    /// ```
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }
}

/// What a worker sends to the caller's thread.
enum Msg<R> {
    /// A task's outcome.
    Done(Outcome<R>),
    /// A worker died; the outcome of the task it was running, if any.
    Died { reason: String, outcome: Option<Outcome<R>> },
}

/// The task a worker is running.
struct InFlight {
    index: usize,
    key: String,
    attempts: u32,
    start: Instant,
}

/// Lives on a worker's stack: if the worker unwinds (dies), reports it and
/// the task it was running.
struct Watch<'a, R> {
    tx: &'a mpsc::Sender<Msg<R>>,
    location: Location,
    slot: usize,
    worker: usize,
    in_flight: Option<InFlight>,
}

impl<R> Drop for Watch<'_, R> {
    fn drop(&mut self) {
        if !thread::panicking() {
            return;
        }
        let c = panics::take(None);
        let died = |task| Error::WorkerDied {
            task,
            device: self.location,
            slot: self.slot,
            worker: self.worker,
            message: c.message.clone(),
            panicked_at: c.location.clone(),
        };
        let reason = died(self.in_flight.as_ref().map(|t| t.key.clone())).to_string();
        let outcome = self.in_flight.take().map(|t| Outcome {
            result: Err(died(Some(t.key.clone()))),
            index: t.index,
            key: t.key,
            device: self.location,
            slot: self.slot,
            attempts: t.attempts,
            duration: t.start.elapsed(),
        });
        let _ = self.tx.send(Msg::Died { reason, outcome });
    }
}

/// Sets the flag when dropped (the caller's loop ended, by return or panic).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What the workers of one run share.
struct Run<'a, T, F> {
    queue: Mutex<VecDeque<(usize, String, T)>>,
    f: &'a F,
    records: Option<Records>,
    retries: u32,
    /// Set when the caller stops listening (its callback panicked).
    stop: AtomicBool,
    closing: &'a AtomicBool,
}

impl<M> Pool<M> {
    /// The devices the pool runs on (those whose init succeeded), in slot
    /// order; empty after [`shutdown`](Pool::shutdown).
    ///
    /// ```
    /// let pool = sire::pool::Pool::builder().devices([sire::Location::Cpu]).build(|_| Ok::<_, String>(()))?;
    /// assert_eq!(pool.devices(), [sire::Location::Cpu]);
    /// # Ok::<(), sire::Error>(())
    /// ```
    pub fn devices(&self) -> Vec<Location> {
        self.slots.read().as_ref().map(|s| s.iter().map(|s| s.location).collect()).unwrap_or_default()
    }

    /// The devices left out, each an [`Error::DeviceInit`] naming the device,
    /// its slot and what the init function said.
    ///
    /// ```
    /// let pool = sire::pool::Pool::builder()
    ///     .devices([sire::Location::Cpu])
    ///     .build(|_| Err::<(), _>("weights not found"))?;
    /// assert!(pool.devices().is_empty());
    /// assert!(pool.init_failures()[0].to_string().contains("weights not found"));
    /// # Ok::<(), sire::Error>(())
    /// ```
    pub fn init_failures(&self) -> &[Error] {
        &self.failures
    }

    /// Whether [`shutdown`](Pool::shutdown) was called (the models may still
    /// be being freed).
    ///
    /// ```
    /// let pool = sire::pool::Pool::builder().devices([sire::Location::Cpu]).build(|_| Ok::<_, String>(()))?;
    /// assert!(!pool.is_shut_down());
    /// pool.shutdown();
    /// assert!(pool.is_shut_down());
    /// # Ok::<(), sire::Error>(())
    /// ```
    pub fn is_shut_down(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Stops the pool: a running [`execute`](Pool::execute) stops handing out
    /// tasks (the running ones finish) and returns [`Error::PoolShutDown`];
    /// then every device's models are dropped and, with CUDA devices,
    /// libtorch's cached CUDA memory is released
    /// ([`empty_cache`](crate::empty_cache)). Calling it again does nothing;
    /// `execute` afterwards is [`Error::PoolShutDown`]. Dropping the pool
    /// shuts it down.
    ///
    /// Called from inside a task, it only stops the run (it cannot wait for
    /// the task calling it); the models are freed by the next call or the drop.
    ///
    /// ```
    /// let pool = sire::pool::Pool::builder().devices([sire::Location::Cpu]).build(|_| Ok::<_, String>(()))?;
    /// pool.shutdown();
    /// pool.shutdown(); // harmless
    /// assert!(pool.devices().is_empty());
    /// # Ok::<(), sire::Error>(())
    /// ```
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        if ON_WORKER.with(Cell::get) {
            return;
        }
        let Some(slots) = self.slots.write().take() else { return };
        let cuda = slots.iter().any(|s| matches!(s.location, Location::Cuda(_)));
        let n = slots.len();
        drop(slots);
        if cuda {
            if let Err(e) = crate::empty_cache() {
                tracing::warn!(target: "sire::pool", error = %e, "could not release the CUDA cache");
            }
        }
        tracing::info!(target: "sire::pool", devices = n, "pool shut down, models freed");
    }
}

impl<M: Sync> Pool<M> {
    /// Runs `f` on every task and returns one [`Outcome`] per task, in task
    /// order. `f` receives the task, the device and that device's models.
    ///
    /// Workers pull from one shared queue, so fast devices take more tasks. A
    /// task that fails or panics is reported in its outcome (after the
    /// builder's retries) and the others go on. A worker that dies (a panic
    /// outside `f`, for instance in a task's `Drop`) reports the task it was
    /// running as [`Error::WorkerDied`] and the others take the rest. A
    /// progress bar shows rate and ETA on a terminal; each task emits a
    /// `tracing` event (target `sire::pool`: debug when it succeeds, warn when
    /// it fails).
    ///
    /// Errors: [`Error::PoolShutDown`], [`Error::NoWorkingDevice`] when every
    /// device's init failed, [`Error::WorkersDied`] when every worker died
    /// with tasks left.
    ///
    /// ```
    /// let pool = sire::pool::Pool::builder()
    ///     .devices([sire::Location::Cpu])
    ///     .workers_per_device(2)
    ///     .build(|_| Ok::<_, String>(()))?;
    /// let out = pool.execute(vec!["a", "bb", "ccc"], |s, _, _| Ok::<_, String>(s.len()))?;
    /// let lens: Vec<usize> = out.into_iter().map(|o| o.result.unwrap()).collect();
    /// assert_eq!(lens, [1, 2, 3]);
    /// # Ok::<(), sire::Error>(())
    /// ```
    pub fn execute<T, R, E, F>(&self, tasks: impl Into<Tasks<T>>, f: F) -> Result<Vec<Outcome<R>>>
    where
        T: Send,
        R: Send,
        E: Into<BoxError>,
        F: Fn(&T, Device, &M) -> std::result::Result<R, E> + Sync,
    {
        let tasks = tasks.into();
        let mut slots: Vec<Option<Outcome<R>>> = (0..tasks.len()).map(|_| None).collect();
        self.execute_streaming(tasks, f, |o| {
            let i = o.index;
            slots[i] = Some(o);
        })?;
        Ok(slots.into_iter().map(|o| o.expect("every task has an outcome when the run succeeds")).collect())
    }

    /// [`execute`](Pool::execute), handing each outcome to `on_outcome` (on
    /// the calling thread) as soon as its task finishes, instead of collecting
    /// them. If `on_outcome` panics, the workers stop after their current
    /// task and the panic goes on.
    ///
    /// ```
    /// let pool = sire::pool::Pool::builder().devices([sire::Location::Cpu]).build(|_| Ok::<_, String>(()))?;
    /// let mut sum = 0;
    /// pool.execute_streaming((1..=100).collect::<Vec<u64>>(), |t, _, _| Ok::<_, String>(*t), |o| {
    ///     sum += o.result.unwrap();
    /// })?;
    /// assert_eq!(sum, 5050);
    /// # Ok::<(), sire::Error>(())
    /// ```
    pub fn execute_streaming<T, R, E, F, C>(
        &self,
        tasks: impl Into<Tasks<T>>,
        f: F,
        mut on_outcome: C,
    ) -> Result<()>
    where
        T: Send,
        R: Send,
        E: Into<BoxError>,
        F: Fn(&T, Device, &M) -> std::result::Result<R, E> + Sync,
        C: FnMut(Outcome<R>),
    {
        let guard = self.slots.read_recursive();
        let slots = match guard.as_ref() {
            Some(s) if !self.closing.load(Ordering::SeqCst) => s,
            _ => return Err(Error::PoolShutDown { tasks: 0, finished: 0 }),
        };
        if slots.is_empty() {
            return Err(Error::NoWorkingDevice {
                devices: self.requested,
                reasons: self.failures.iter().map(ToString::to_string).collect(),
            });
        }
        let tasks = tasks.into();
        let (n, skipped) = (tasks.len(), tasks.skipped());
        let run = Run {
            queue: Mutex::new(tasks.entries.into_iter().enumerate().map(|(i, (k, t))| (i, k, t)).collect()),
            f: &f,
            records: tasks.records,
            retries: self.config.retries,
            stop: AtomicBool::new(false),
            closing: &self.closing,
        };
        let _hook = panics::install();
        let bar = self.bar(n);
        let workers = slots.len() * self.config.workers;
        let (mut finished, mut failed) = (0usize, 0usize);
        let mut reasons = Vec::new();
        let mut spawn_error = None;
        tracing::info!(target: "sire::pool", tasks = n, devices = slots.len(), workers, skipped, "run starts");
        thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<Msg<R>>();
            let mut handles = Vec::with_capacity(workers);
            'spawn: for slot in slots {
                for worker in 0..self.config.workers {
                    let (tx, run) = (tx.clone(), &run);
                    let spawned = thread::Builder::new()
                        .name(format!("sire-pool-{}-{worker}", slot.slot))
                        .spawn_scoped(s, move || work(run, slot, worker, &tx));
                    match spawned {
                        Ok(h) => handles.push(h),
                        Err(e) => {
                            run.stop.store(true, Ordering::SeqCst);
                            spawn_error = Some(Error::Io(e));
                            break 'spawn;
                        }
                    }
                }
            }
            drop(tx);
            let _stop = SetOnDrop(&run.stop);
            for msg in rx {
                let outcome = match msg {
                    Msg::Done(o) => o,
                    Msg::Died { reason, outcome } => {
                        tracing::error!(target: "sire::pool", %reason, "worker died");
                        reasons.push(reason);
                        match outcome {
                            Some(o) => o,
                            None => continue,
                        }
                    }
                };
                finished += 1;
                bar.inc(1);
                match &outcome.result {
                    Ok(_) => tracing::debug!(
                        target: "sire::pool", task = %outcome.key, device = %outcome.device, slot = outcome.slot,
                        attempts = outcome.attempts, seconds = outcome.duration.as_secs_f64(), "task done"
                    ),
                    Err(e) => {
                        failed += 1;
                        bar.set_message(format!("{} ({failed} failed)", self.config.description));
                        tracing::warn!(
                            target: "sire::pool", task = %outcome.key, device = %outcome.device, slot = outcome.slot,
                            attempts = outcome.attempts, seconds = outcome.duration.as_secs_f64(), error = %e, "task failed"
                        )
                    }
                }
                on_outcome(outcome);
            }
            for h in handles {
                // A worker that died has reported it through its watch.
                let _ = h.join();
            }
        });
        bar.finish();
        if let Some(e) = spawn_error {
            return Err(e);
        }
        if finished < n {
            if self.closing.load(Ordering::SeqCst) {
                return Err(Error::PoolShutDown { tasks: n, finished });
            }
            return Err(Error::WorkersDied { workers, tasks: n, finished, reasons });
        }
        tracing::info!(target: "sire::pool", tasks = n, failed, "run done");
        Ok(())
    }

    /// The progress bar of a run of `n` tasks (hidden unless asked for and on a terminal).
    fn bar(&self, n: usize) -> ProgressBar {
        if !self.config.progress || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg} {wide_bar} {pos}/{len} [{elapsed_precise}, {per_sec}, ETA {eta}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(self.config.description.clone());
        bar
    }
}

/// A worker: takes tasks from the queue until it is empty (or the run stops),
/// runs each with its retries, records it, reports its outcome.
fn work<T, R, E, F, M>(run: &Run<'_, T, F>, slot: &Slot<M>, worker: usize, tx: &mpsc::Sender<Msg<R>>)
where
    E: Into<BoxError>,
    F: Fn(&T, Device, &M) -> std::result::Result<R, E>,
{
    panics::capture_this_thread();
    ON_WORKER.with(|w| w.set(true));
    let mut watch = Watch { tx, location: slot.location, slot: slot.slot, worker, in_flight: None };
    loop {
        if run.stop.load(Ordering::Relaxed) || run.closing.load(Ordering::Relaxed) {
            break;
        }
        let Some((index, key, task)) = run.queue.lock().pop_front() else { break };
        let start = Instant::now();
        let t = watch.in_flight.insert(InFlight { index, key, attempts: 0, start });
        let mut result;
        loop {
            t.attempts += 1;
            panics::clear();
            result = match catch_unwind(AssertUnwindSafe(|| (run.f)(&task, slot.device, &slot.models))) {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(Error::TaskFailed {
                    task: t.key.clone(),
                    device: slot.location,
                    slot: slot.slot,
                    attempts: t.attempts,
                    source: e.into(),
                }),
                Err(payload) => {
                    let c = panics::take(Some(&*payload));
                    Err(Error::TaskPanicked {
                        task: t.key.clone(),
                        device: slot.location,
                        slot: slot.slot,
                        attempts: t.attempts,
                        message: c.message,
                        panicked_at: c.location,
                        backtrace: c.backtrace,
                    })
                }
            };
            if result.is_ok() || t.attempts > run.retries {
                break;
            }
        }
        let duration = start.elapsed();
        if let (Ok(_), Some(records)) = (&result, &run.records) {
            if let Err(e) = records.write(&t.key, slot.location, t.attempts, duration) {
                result = Err(e);
            }
        }
        // The task is dropped while in flight: a panic in its `Drop` kills
        // this worker, and the watch reports the task.
        drop(task);
        let InFlight { index, key, attempts, .. } = watch.in_flight.take().expect("set above");
        let outcome =
            Outcome { index, key, device: slot.location, slot: slot.slot, attempts, duration, result };
        if tx.send(Msg::Done(outcome)).is_err() {
            break;
        }
    }
}
