//! Managed models and the guards that put them to work.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use tch::Device;

use crate::engine::{ModelCore, OwnedUse, Use, Wait};
use crate::error::panic_message;
use crate::patch::commit::{self, Commit, CommitId, CommitInfo, Stack};
use crate::patch::variant::{self, CommitHold, ModelCommits};
use crate::runtime::global;
use crate::{Error, Location, ManageOptions, ResourcePoolManagement, ResourceUser, Result};

/// A model registered with a [`ResourcePoolManagement`].
///
/// A cheap handle: clones share the model. Its weights move between tiers on
/// their own; use them inside a guard from [`auto_manage`]. When the last
/// handle is dropped the model is unregistered and its spill file deleted.
///
/// A handle also carries a stack of commits (patches such as LoRA, see
/// [`Managed::commit`]), shared by its clones; [`Managed::variant`] makes a
/// handle with a stack of its own over the same base weights.
pub struct Managed<T> {
    shared: Arc<Shared<T>>,
    stack: Arc<Stack>,
}

struct Shared<T> {
    model: T,
    core: Arc<ModelCore>,
    pools: ResourcePoolManagement,
    commits: ModelCommits,
    /// `ResourceUser::on_moved` of `T`.
    on_moved: fn(&T, Device),
    /// The model's move count when `on_moved` was last called.
    seen_moves: AtomicU64,
}

impl<T> Shared<T> {
    /// Gives back an owned guard's use.
    #[inline]
    fn release(&self, hold: Owned) {
        match hold {
            Owned::Plain => self.pools.inner.release(&self.core),
            Owned::Commit(thread) => variant::release(&self.pools.inner, &self.core, &self.commits, thread),
        }
    }

    /// Tells the model, before a guard hands it out, that its weights moved
    /// since the last time (`ResourceUser::on_moved`, with the device they are on).
    #[inline]
    fn notice_moves(&self) {
        let moves = self.core.moves.load(Relaxed);
        if moves != self.seen_moves.load(Relaxed) && self.seen_moves.swap(moves, Relaxed) != moves {
            (self.on_moved)(&self.model, self.core.device());
        }
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        self.pools.inner.unregister(&self.core);
    }
}

/// A borrowed guard's taker: counted by its thread (a nested guard of the
/// same stack on this thread is admitted at once).
const BORROWED: variant::Taker<'static> = variant::Taker { borrowed: true, cancel: None };
/// An owned hold's taker (a batch): never nested.
const OWNED: variant::Taker<'static> = variant::Taker { borrowed: false, cancel: None };

/// How a guard holds its model.
enum Hold<'a> {
    /// A plain use (a model without commits).
    Plain(Use<'a>),
    /// Through the commit path: admitted, with the handle's stack applied.
    Commit(CommitHold<'a>),
}

impl Hold<'_> {
    /// Hands the hold over to an owner that releases it with `Shared::release`.
    fn into_owned(self) -> Owned {
        match self {
            Hold::Plain(u) => {
                u.forget();
                Owned::Plain
            }
            Hold::Commit(h) => Owned::Commit(h.forget()),
        }
    }
}

/// A hold handed over to an owner ([`OwnedGuard`], [`Batch`]).
#[derive(Debug, Clone, Copy)]
enum Owned {
    Plain,
    /// Through the commit path, counted among the holders as this.
    Commit(Option<ThreadId>),
}

impl<T> Clone for Managed<T> {
    fn clone(&self) -> Self {
        Managed { shared: self.shared.clone(), stack: self.stack.clone() }
    }
}

impl<T> fmt::Debug for Managed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Managed")
            .field("name", &self.name())
            .field("bytes", &self.size_bytes())
            .field("runtime", &self.shared.core.runtime())
            .finish_non_exhaustive()
    }
}

impl<T: ResourceUser> Managed<T> {
    pub(crate) fn new(model: T, core: Arc<ModelCore>, pools: ResourcePoolManagement) -> Self {
        Managed {
            shared: Arc::new(Shared {
                model,
                core,
                pools,
                commits: ModelCommits::default(),
                on_moved: <T as ResourceUser>::on_moved,
                seen_moves: AtomicU64::new(0),
            }),
            stack: Arc::default(),
        }
    }
}

impl<T> Managed<T> {
    /// The model's name.
    pub fn name(&self) -> &str {
        &self.shared.core.name
    }

    /// Bytes of parameters and buffers (shared storage counted once).
    pub fn size_bytes(&self) -> u64 {
        self.shared.core.bytes
    }

    /// Where the model runs while guarded. A model registered without an
    /// explicit runtime ([`ManageOptions::runtime`]) on a machine with several
    /// CUDA devices is placed at each load: on the device it is resident on,
    /// else on the one with the most free budget; this tells the latest choice.
    pub fn runtime(&self) -> Location {
        self.shared.core.runtime()
    }

    /// Where the weights are now: the runtime location if resident there, else
    /// `Cpu` if in host memory, else `Disk`.
    pub fn location(&self) -> Location {
        self.shared.pools.inner.location_of(&self.shared.core)
    }

    /// Live guards on the model.
    pub fn use_count(&self) -> u64 {
        self.shared.core.uses()
    }

    /// The instance the model is registered with.
    pub fn pools(&self) -> &ResourcePoolManagement {
        &self.shared.pools
    }

    /// Offloads the model now, to its offload location, if no guard is alive
    /// ([`Error::InUse`](crate::Error::InUse) otherwise).
    pub fn offload(&self) -> Result<()> {
        self.shared.pools.inner.offload_now(&self.shared.core)
    }

    /// Access to the wrapped model *without* a guard: its weights may be on any
    /// tier (or empty while spilled). Meant for inspection, not computation.
    pub fn get_unguarded(&self) -> &T {
        &self.shared.model
    }

    /// A type-erased handle on the model, for [`auto_manage_all`]. It keeps
    /// the model registered while it lives.
    pub fn handle(&self) -> ModelHandle
    where
        T: Send + Sync + 'static,
    {
        ModelHandle { core: self.shared.core.clone(), keep: self.shared.clone(), stack: self.stack.clone() }
    }

    /// Takes a use, through the commit path when the model has commits
    /// (see `patch/commit.rs`), for a borrowed guard or an owned one (`taker`).
    #[inline]
    fn acquire(&self, wait: Wait, taker: variant::Taker<'_>) -> Result<Hold<'_>> {
        let s = &*self.shared;
        if !s.commits.is_active() {
            let used = s.pools.inner.acquire(&s.core, wait)?;
            if !s.commits.is_active_after_acquire() {
                s.notice_moves();
                return Ok(Hold::Plain(used));
            }
            // The model got its first commit meanwhile: take the commit path.
            drop(used);
        }
        let hold = variant::acquire(&s.pools.inner, &s.core, &s.commits, &self.stack, wait, taker)?;
        s.notice_moves();
        Ok(Hold::Commit(hold))
    }
}

// ----------------------------------------------------------------- commits (see commit.rs)

impl<T> Managed<T> {
    /// Pushes a commit onto this handle's stack and returns its id.
    ///
    /// Every target name, shape and dtype is checked first, against the model's
    /// inventory (no weights need to be loaded); on error nothing changes. The
    /// weights change lazily: the next guard from this handle (or a clone) brings
    /// the model to the new stack, after guards already alive have dropped (a
    /// live guard's weights never change under it). Patches go to the runtime
    /// copy only; the base weights are never written, so reverts are exact and an
    /// evicted model comes back with the same patches.
    ///
    /// ```
    /// # fn main() -> sire::Result<()> {
    /// use sire::{Commit, TensorSet};
    /// use tch::{Kind, Tensor};
    /// # let dir = tempfile::tempdir()?;
    /// # let pools = sire::ResourcePoolManagement::builder().cuda(false).env(false)
    /// #     .cpu_budget(64 << 20).spill_dir(dir.path()).build()?;
    /// let w = Tensor::randn([8, 16], (Kind::Float, tch::Device::Cpu));
    /// let m = pools.manage(TensorSet::new([("w", w.copy())])?)?;
    /// let (a, b) = (Tensor::randn([2, 16], tch::kind::FLOAT_CPU), Tensor::randn([8, 2], tch::kind::FLOAT_CPU));
    /// let id = m.commit(Commit::lora("w", a.copy(), b.copy(), 0.5))?;
    /// {
    ///     let g = sire::auto_manage(&m)?; // the LoRA is applied here
    ///     assert!(g.get("w").unwrap().equal(&(&w + (&b * 0.5).mm(&a))));
    /// }
    /// assert_eq!(m.revert(), Some(id));
    /// let g = sire::auto_manage(&m)?;
    /// assert!(g.get("w").unwrap().equal(&w)); // bit for bit
    /// # Ok(()) }
    /// ```
    pub fn commit(&self, commit: Commit) -> Result<CommitId> {
        let s = &*self.shared;
        let record = commit::resolve(&s.core.name, s.commits.index(&s.core), commit)?;
        let id = record.id();
        s.commits.activate(&s.core);
        self.stack.push(record);
        Ok(id)
    }

    /// Pops the newest commit of this handle's stack (a squashed commit as one
    /// unit) and returns its id, or `None` if the stack is empty. Like
    /// [`commit`](Managed::commit), it takes effect at the next guard.
    pub fn revert(&self) -> Option<CommitId> {
        self.stack.pop()
    }

    /// Reverts every commit newer than `id`, which stays;
    /// [`Error::UnknownCommit`] if `id` is not on this handle's stack.
    pub fn revert_to(&self, id: CommitId) -> Result<()> {
        if self.stack.truncate(Some(id)) {
            Ok(())
        } else {
            Err(Error::UnknownCommit { model: self.name().to_string(), id })
        }
    }

    /// Reverts every commit: the next guard sees the base weights, bit for bit.
    pub fn revert_all(&self) {
        self.stack.truncate(None);
    }

    /// This handle's commits, oldest first.
    pub fn commits(&self) -> Vec<CommitInfo> {
        self.stack.infos()
    }

    /// A handle on the same model (same base weights, same pools) with a commit
    /// stack of its own, starting as a copy of this handle's stack.
    ///
    /// Guards from handles whose stacks are equal share the model; a guard from
    /// a handle with another stack waits until every guard of the model has
    /// dropped, then rebases the model (reverts the divergent commits, newest
    /// first, and applies the missing ones) and holds it until dropped. Variants
    /// used from several threads therefore take turns on the one base copy; a
    /// thread that holds a guard from one variant and asks for a guard from
    /// another waits out its timeout and gets [`Error::InUse`].
    pub fn variant(&self) -> Managed<T> {
        self.shared.commits.activate(&self.shared.core);
        Managed { shared: self.shared.clone(), stack: Arc::new(self.stack.fork()) }
    }

    /// The names of the model's tensors (aliases included), as commits name them.
    pub fn tensor_names(&self) -> Vec<String> {
        self.shared.commits.index(&self.shared.core).names().to_vec()
    }
}

/// Puts the model on its runtime device and returns a guard; the model stays
/// there, and cannot be evicted, while any guard on it is alive.
///
/// If the model is already resident this moves nothing and takes no lock. If
/// the room is held by models in use, it waits for a guard to drop, up to the
/// instance's wait timeout (see [`Builder::wait_timeout`](crate::Builder::wait_timeout)),
/// then fails with [`Error::OutOfMemory`](crate::Error::OutOfMemory). A model
/// larger than the whole budget fails at once with
/// [`Error::TooLarge`](crate::Error::TooLarge).
pub fn auto_manage<T>(m: &Managed<T>) -> Result<Guard<'_, T>> {
    let timeout = m.shared.pools.inner.wait_timeout;
    auto_manage_timeout(m, timeout)
}

/// Like [`auto_manage`], waiting at most `timeout` for room.
/// A timeout too large to represent as an instant (`Duration::MAX`) waits forever.
pub fn auto_manage_timeout<T>(m: &Managed<T>, timeout: Duration) -> Result<Guard<'_, T>> {
    let hold = m.acquire(Wait::timeout(timeout), BORROWED)?;
    Ok(Guard { shared: &m.shared, _hold: hold })
}

/// Like [`auto_manage`], but never waits: fails at once if room is held by models in use.
pub fn try_auto_manage<T>(m: &Managed<T>) -> Result<Guard<'_, T>> {
    let hold = m.acquire(Wait::No, BORROWED)?;
    Ok(Guard { shared: &m.shared, _hold: hold })
}

/// Like [`auto_manage`], returning a guard that owns a handle on the model
/// (`'static`, can be moved to another thread or stored).
pub fn auto_manage_owned<T>(m: &Managed<T>) -> Result<OwnedGuard<T>> {
    m.owned_timeout(m.shared.pools.inner.wait_timeout)
}

/// Registers a model with the global instance (set up on first use), with default options.
pub fn manage<T: ResourceUser>(model: T) -> Result<Managed<T>> {
    global()?.manage(model)
}

/// Registers a model with the global instance, with options.
pub fn manage_with<T: ResourceUser>(model: T, opts: ManageOptions) -> Result<Managed<T>> {
    global()?.manage_with(model, opts)
}

/// Proof that a model is on its runtime device; dereferences to the model.
/// Dropping it (also by a panic unwinding) gives the use back.
#[must_use = "the model may be evicted as soon as the guard is dropped"]
pub struct Guard<'a, T> {
    shared: &'a Shared<T>,
    /// Released on drop.
    _hold: Hold<'a>,
}

impl<T> Guard<'_, T> {
    /// The device the model's weights are on: move inputs here.
    pub fn device(&self) -> Device {
        self.shared.core.device()
    }
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.shared.model
    }
}

impl<T> fmt::Debug for Guard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("model", &self.shared.core.name)
            .field("device", &self.device())
            .finish()
    }
}

/// A guard that owns a handle on its model; see [`auto_manage_owned`].
#[must_use = "the model may be evicted as soon as the guard is dropped"]
pub struct OwnedGuard<T> {
    shared: Arc<Shared<T>>,
    hold: Owned,
}

impl<T> OwnedGuard<T> {
    /// The device the model's weights are on: move inputs here.
    pub fn device(&self) -> Device {
        self.shared.core.device()
    }
}

impl<T> Deref for OwnedGuard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.shared.model
    }
}

impl<T> Drop for OwnedGuard<T> {
    fn drop(&mut self) {
        self.shared.release(self.hold);
    }
}

impl<T> fmt::Debug for OwnedGuard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedGuard")
            .field("model", &self.shared.core.name)
            .field("device", &self.device())
            .finish()
    }
}

/// A type-erased handle on a managed model ([`Managed::handle`]): what
/// operations on several models of different types take. Cheap to clone.
#[derive(Clone)]
pub struct ModelHandle {
    core: Arc<ModelCore>,
    keep: Arc<dyn Registration>,
    /// The commit stack of the handle it came from.
    stack: Arc<Stack>,
}

/// What a [`ModelHandle`] keeps alive: the model's registration.
trait Registration: Send + Sync {
    fn pools(&self) -> &ResourcePoolManagement;
    fn commits(&self) -> &ModelCommits;
}

impl<T: Send + Sync> Registration for Shared<T> {
    fn pools(&self) -> &ResourcePoolManagement {
        &self.pools
    }
    fn commits(&self) -> &ModelCommits {
        &self.commits
    }
}

impl ModelHandle {
    /// The model's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// Where the model's weights are now (see [`Managed::location`]).
    pub fn location(&self) -> Location {
        self.keep.pools().inner.location_of(&self.core)
    }
}

impl fmt::Debug for ModelHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelHandle").field("name", &self.name()).finish_non_exhaustive()
    }
}

/// Puts several models on their runtime devices together and keeps them there
/// while the returned [`Batch`] lives; guards taken on them meanwhile
/// ([`auto_manage`]) are hits that move nothing.
///
/// Room for all of them is made first (they never evict each other), then
/// every copy is issued and each device is synchronised once, so a pipeline's
/// models load in one round instead of one after the other. All or nothing: on
/// an error no model is held (those that did load stay resident, idle). Waits
/// for room like [`auto_manage`]. The models must belong to one
/// [`ResourcePoolManagement`] ([`Error::ForeignModel`](crate::Error::ForeignModel)
/// otherwise); a model named twice counts once.
///
/// ```
/// # fn main() -> sire::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// let pools = sire::ResourcePoolManagement::builder().cuda(false).cpu_budget(1 << 20).spill_dir(dir.path()).build()?;
/// let ones = |n| sire::TensorSet::new([("w", tch::Tensor::ones([n], tch::kind::FLOAT_CPU))]);
/// let (text, unet) = (pools.manage(ones(1024)?)?, pools.manage(ones(4096)?)?);
/// text.offload()?;
/// unet.offload()?;
/// let batch = sire::auto_manage_all(&[text.handle(), unet.handle()])?;
/// assert_eq!((text.location(), unet.location()), (sire::Location::Cpu, sire::Location::Cpu));
/// let (t, u) = (sire::auto_manage(&text)?, sire::auto_manage(&unet)?); // hits: nothing moves
/// # drop((t, u, batch));
/// # Ok(()) }
/// ```
pub fn auto_manage_all(models: &[ModelHandle]) -> Result<Batch> {
    let mut distinct: Vec<ModelHandle> = Vec::with_capacity(models.len());
    for m in models {
        if !distinct.iter().any(|d| Arc::ptr_eq(&d.core, &m.core)) {
            distinct.push(m.clone());
        }
    }
    let Some(first) = distinct.first() else { return Ok(Batch { models: Vec::new() }) };
    let pools = first.keep.pools().clone();
    if let Some(other) = distinct.iter().find(|m| !Arc::ptr_eq(&m.keep.pools().inner, &pools.inner)) {
        return Err(crate::Error::ForeignModel { model: other.name().to_string() });
    }
    let cores: Vec<Arc<ModelCore>> = distinct.iter().map(|m| m.core.clone()).collect();
    // One deadline for the whole call, however many attempts it takes.
    let wait = Wait::timeout(pools.inner.wait_timeout).start();
    let deadline = wait.deadline();
    let mut pause = Duration::from_micros(100);
    loop {
        let uses = pools.inner.acquire_many(&cores, wait)?;
        let attempt = batch_holds(&pools, &distinct, &cores, uses)
            .map(|holds| holds.into_iter().map(Hold::into_owned).collect::<Vec<Owned>>());
        match attempt {
            Ok(owned) => return Ok(Batch { models: distinct.into_iter().zip(owned).collect() }),
            // Every hold was dropped with the error: nothing is held while waiting.
            Err(e @ (Error::InUse { .. } | Error::OutOfMemory { .. })) => {
                let left =
                    deadline.and_then(|d| d.instant()).map(|at| at.saturating_duration_since(Instant::now()));
                if left.is_some_and(|l| l.is_zero()) {
                    return Err(e);
                }
                std::thread::sleep(left.map_or(pause, |l| l.min(pause)));
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Turns a batch's plain uses into holds: models with commits are brought to
/// their handle's stack (the commit path, which waits for the model's other
/// guards to drop, our plain use included: so that use is given back first;
/// the model is resident, so this is a hit). The commit path does not wait
/// here: a batch waiting for one model's variant lock while holding another
/// model would deadlock with a batch (or a guard) that holds the second and
/// waits for the first, so a busy model fails the attempt (`InUse`, or
/// `OutOfMemory` for patch room) and [`auto_manage_all`] tries again with
/// nothing held. Every hold is a value: if one model fails, dropping them
/// releases the others.
fn batch_holds<'a>(
    pools: &'a ResourcePoolManagement,
    models: &'a [ModelHandle],
    cores: &'a [Arc<ModelCore>],
    uses: Vec<Use<'a>>,
) -> Result<Vec<Hold<'a>>> {
    let mut holds: Vec<Hold<'_>> = Vec::with_capacity(models.len());
    for (i, used) in uses.into_iter().enumerate() {
        let m = &models[i];
        if m.keep.commits().is_active() {
            drop(used);
            let hold =
                variant::acquire(&pools.inner, &cores[i], m.keep.commits(), &m.stack, Wait::No, OWNED)?;
            holds.push(Hold::Commit(hold));
        } else {
            holds.push(Hold::Plain(used));
        }
    }
    Ok(holds)
}

/// Models held on their runtime devices by [`auto_manage_all`]; dropping it
/// gives them back.
#[must_use = "the models may be evicted as soon as the batch is dropped"]
#[derive(Debug)]
pub struct Batch {
    /// The models, and how each is held.
    models: Vec<(ModelHandle, Owned)>,
}

impl Batch {
    /// The models held.
    pub fn models(&self) -> impl Iterator<Item = &ModelHandle> {
        self.models.iter().map(|(m, _)| m)
    }

    /// How many models are held.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    /// Whether no model is held.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        for (m, hold) in &self.models {
            let inner = &m.keep.pools().inner;
            match *hold {
                Owned::Plain => inner.release(&m.core),
                Owned::Commit(thread) => variant::release(inner, &m.core, m.keep.commits(), thread),
            }
        }
    }
}

/// Starts loading a model in the background and returns at once: its
/// transfer overlaps whatever the caller does meanwhile (on a GPU, the copies
/// run on a side stream, so they overlap kernels of the model in use; without
/// one, disk reads overlap computation). [`Prefetch::wait`] returns the guard.
///
/// Dropping the [`Prefetch`] without waiting is allowed: the model then stays
/// resident like any idle model (unless its policy is eager).
///
/// ```
/// # fn main() -> sire::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// # let pools = sire::ResourcePoolManagement::builder().cuda(false).cpu_budget(1 << 20).spill_dir(dir.path()).build()?;
/// let next = pools.manage(sire::TensorSet::new([("w", tch::Tensor::ones([4096], tch::kind::FLOAT_CPU))])?)?;
/// next.offload()?;
/// let pending = sire::prefetch(&next);
/// // ... compute with the current model here ...
/// let g = pending.wait()?; // loaded meanwhile
/// assert_eq!(g.get("w").unwrap().sum(tch::Kind::Float).double_value(&[]), 4096.0);
/// # Ok(()) }
/// ```
pub fn prefetch<T: Send + Sync + 'static>(m: &Managed<T>) -> Prefetch<T> {
    let m = m.clone();
    let name = m.name().to_string();
    // The caller's streams, taken on the caller's thread: wherever placement
    // puts the model, its buffers are handed to the stream that will use them.
    let devices: Vec<usize> = m
        .shared
        .pools
        .pools()
        .iter()
        .filter_map(|(l, _)| match l {
            Location::Cuda(i) => Some(*i),
            _ => None,
        })
        .collect();
    let consumers = crate::engine::transfer::consumer_streams(&devices);
    let thread = std::thread::Builder::new().name(format!("sire-prefetch-{name}")).spawn(move || {
        let _span = tracing::debug_span!("sire.prefetch", model = %m.name()).entered();
        let timeout = m.shared.pools.inner.wait_timeout;
        crate::engine::transfer::as_prefetch(consumers, || m.owned_timeout(timeout))
    });
    Prefetch { thread: Some(thread), name }
}

/// A load under way; see [`prefetch`].
#[must_use = "dropping it does not cancel the load; wait() returns the guard"]
pub struct Prefetch<T> {
    thread: Option<std::io::Result<std::thread::JoinHandle<Result<OwnedGuard<T>>>>>,
    name: String,
}

impl<T> Prefetch<T> {
    /// Waits for the load and returns a guard on the model.
    pub fn wait(mut self) -> Result<OwnedGuard<T>> {
        match self.thread.take().expect("waited once") {
            Err(e) => Err(crate::Error::Io(e)),
            Ok(h) => h.join().unwrap_or_else(|p| {
                Err(crate::Error::MovePanicked { model: self.name.clone(), message: panic_message(&*p) })
            }),
        }
    }

    /// Whether the load has finished (successfully or not).
    pub fn is_finished(&self) -> bool {
        match &self.thread {
            Some(Ok(h)) => h.is_finished(),
            _ => true,
        }
    }
}

impl<T> fmt::Debug for Prefetch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prefetch").field("model", &self.name).field("finished", &self.is_finished()).finish()
    }
}

// Crate-internal access for the async layer.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))]
impl<T> Managed<T> {
    pub(crate) fn core(&self) -> &Arc<ModelCore> {
        &self.shared.core
    }

    /// Wraps a use the caller took (`Engine::hit`, or an attempt on the
    /// blocking pool) in an owned guard, which releases it on drop.
    pub(crate) fn adopt_use(&self, used: OwnedUse) -> OwnedGuard<T> {
        used.forget();
        self.shared.notice_moves();
        OwnedGuard { shared: self.shared.clone(), hold: Owned::Plain }
    }

    /// Whether guards go through the commit path (commits or variants exist).
    pub(crate) fn has_commits(&self) -> bool {
        self.shared.commits.is_active()
    }

    /// Whether the model got its first commit, read after taking a use.
    pub(crate) fn has_commits_after_acquire(&self) -> bool {
        self.shared.commits.is_active_after_acquire()
    }

    /// Sets the model's recency stamp (see `Engine::reserve_stamps`):
    /// among idle models, the smallest stamp is evicted first. A hint only:
    /// the next use stamps it again.
    pub(crate) fn set_last_used(&self, stamp: u64) {
        self.shared.core.last_used.store(stamp, Relaxed);
    }

    /// [`auto_manage_owned`] with a timeout.
    pub(crate) fn owned_timeout(&self, timeout: Duration) -> Result<OwnedGuard<T>> {
        self.owned_cancellable(timeout, None)
    }

    /// [`Managed::owned_timeout`] for a caller that may give up: once `cancel`
    /// is set, a wait for a variant's turn ends and nothing more is taken.
    pub(crate) fn owned_cancellable(
        &self,
        timeout: Duration,
        cancel: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<OwnedGuard<T>> {
        let taker = variant::Taker { borrowed: false, cancel };
        let hold = self.acquire(Wait::timeout(timeout), taker)?.into_owned();
        Ok(OwnedGuard { shared: self.shared.clone(), hold })
    }
}
