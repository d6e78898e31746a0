//! Exclusive sharing of one device (the `SharedModelManager` pattern): models
//! wait off the device, and at most one of them is on it at a time, for the
//! whole life of the guards that use it.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use tch::Device;

use crate::engine::signal::Deadline;
use crate::runtime::global;
use crate::{
    auto_manage_owned, Error, Location, ManageOptions, Managed, OwnedGuard, ResourcePoolManagement,
    ResourceUser, Result,
};

/// Models that take turns on one shared device.
///
/// [`add`](Self::add) registers a model off the device (in host memory, or on
/// the disk when the device is the CPU) and returns its id;
/// [`fetch_model`](Self::fetch_model) returns an [`ExclusiveGuard`] once the
/// model is on the device. At most one of the manager's models is on the
/// shared device at any instant, and the model of a live guard keeps the device
/// until the guard is dropped: a fetch of another model waits for it, then
/// offloads it and loads its own. Several guards on the *same* model may be
/// alive together. Fetching the model that is already on the device moves
/// nothing. Fetches are served in arrival order.
///
/// The shared device is the first CUDA device of the pools, or the CPU without
/// one (models then wait on the disk). Cheap to clone: clones share the models.
///
/// ```
/// use sire::{SharedModelManager, TensorSet};
/// use tch::{kind::FLOAT_CPU, Tensor};
///
/// # fn main() -> sire::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// # let pools = sire::ResourcePoolManagement::builder().cuda(false).env(false).spill_dir(dir.path()).build()?;
/// let shared = SharedModelManager::with_pools(pools);
/// let a = shared.add(TensorSet::new([("w", Tensor::ones([4], FLOAT_CPU))])?)?;
/// let b = shared.add(TensorSet::new([("w", Tensor::zeros([4], FLOAT_CPU))])?)?;
/// assert_eq!((a.as_str(), b.as_str()), ("TensorSet", "TensorSet#2"));
/// {
///     let g = shared.fetch_model::<TensorSet>(&a)?;      // a on the device
///     assert_eq!(shared.model_location(&a)?, shared.location());
///     assert_eq!(g.get("w").unwrap().sum(tch::Kind::Float).double_value(&[]), 4.0);
/// }
/// let g = shared.fetch_model::<TensorSet>(&b)?;          // a offloaded, then b loaded
/// assert_ne!(shared.model_location(&a)?, shared.location());
/// # drop(g);
/// assert!(matches!(shared.fetch_model::<TensorSet>("c"), Err(sire::Error::UnknownModel { .. })));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SharedModelManager {
    inner: Arc<Inner>,
}

struct Inner {
    pools: ResourcePoolManagement,
    location: Location,
    models: RwLock<BTreeMap<String, Arc<dyn Model>>>,
    turn: Arc<Turnstile>,
}

/// The type-erased side of a registered model.
trait Model: Send + Sync {
    fn offload(&self) -> Result<()>;
    fn location(&self) -> Location;
    fn type_name(&self) -> &'static str;
    fn as_any(&self) -> &dyn Any;
}

impl<T: ResourceUser + Sync> Model for Managed<T> {
    fn offload(&self) -> Result<()> {
        Managed::offload(self)
    }
    fn location(&self) -> Location {
        Managed::location(self)
    }
    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl SharedModelManager {
    /// A manager on the global instance (see
    /// [`setup_default_pools`](crate::setup_default_pools)).
    pub fn new() -> Result<Self> {
        Ok(Self::with_pools(global()?))
    }

    /// A manager on the given instance. Its shared device is the instance's
    /// first CUDA pool, or the CPU when it has none.
    pub fn with_pools(pools: ResourcePoolManagement) -> Self {
        let location = pools
            .pools()
            .iter()
            .map(|&(l, _)| l)
            .find(|l| matches!(l, Location::Cuda(_)))
            .unwrap_or(Location::Cpu);
        SharedModelManager {
            inner: Arc::new(Inner {
                pools,
                location,
                models: RwLock::new(BTreeMap::new()),
                turn: Arc::new(Turnstile::default()),
            }),
        }
    }

    /// Registers a model and returns its id, which is also its name in the
    /// pools (stats, events, errors): the short name of its type (`Detector`
    /// for `my_crate::Detector`), with `#2`, `#3`… appended when another model
    /// of the pools has that name. The model is kept off the shared device until
    /// fetched; where the shared device is the CPU, this writes it to the disk tier.
    pub fn add<T: ResourceUser + Sync>(&self, model: T) -> Result<String> {
        self.register(None, model)
    }

    /// Registers a model under the given id ([`Error::InvalidOptions`] if the
    /// id, or the name of another model of the pools, is taken); see [`add`](Self::add).
    pub fn add_with_id<T: ResourceUser + Sync>(&self, id: impl Into<String>, model: T) -> Result<()> {
        let id = id.into();
        if self.inner.models.read().contains_key(&id) {
            return Err(Error::InvalidOptions { model: id, reason: "this id is already taken".into() });
        }
        self.register(Some(id), model).map(|_| ())
    }

    /// Registers the model (the pools choose a free name when `id` is `None`).
    fn register<T: ResourceUser + Sync>(&self, id: Option<String>, model: T) -> Result<String> {
        let mut opts = ManageOptions::new().runtime(self.inner.location);
        if let Some(id) = id {
            opts = opts.name(id);
        }
        let m = self.inner.pools.manage_with(model, opts)?;
        // Registration leaves the weights in host memory, which is the shared
        // device when there is no GPU: move them to the offload tier.
        m.offload()?;
        let id = m.name().to_string();
        let mut models = self.inner.models.write();
        if models.contains_key(&id) {
            return Err(Error::InvalidOptions { model: id, reason: "this id is already taken".into() });
        }
        models.insert(id.clone(), Arc::new(m));
        Ok(id)
    }

    /// Waits for the shared device, makes `id` its occupant (offloading the
    /// previous one, then loading this one; nothing moves if it is already
    /// there) and returns a guard that keeps it there until dropped.
    ///
    /// Blocks the calling thread while it waits: in async code use
    /// `fetch_model_async` (the `tokio` feature). Errors:
    /// [`Error::UnknownModel`] (with the known ids), [`Error::WrongModelType`]
    /// when `T` is not the type the model was added as, and the errors of
    /// [`auto_manage`](crate::auto_manage) and [`Managed::offload`].
    pub fn fetch_model<T: 'static>(&self, id: &str) -> Result<ExclusiveGuard<T>> {
        let m = self.typed::<T>(id)?;
        let deadline = Deadline::after(self.inner.pools.inner.wait_timeout);
        let (mut permit, admit) = self.inner.turn.enter_blocking(id, deadline)?;
        if let Admit::Switch { prev } = &admit {
            if let Some(prev) = prev {
                offload_within(&*self.model(prev)?, deadline)?;
            }
            // From here on `id` may be on the device, even if its load fails:
            // the next switch offloads it.
            self.inner.turn.occupy(id);
        }
        let guard = auto_manage_owned(&m)?;
        permit.switched();
        Ok(ExclusiveGuard { guard, _permit: permit, id: id.to_string() })
    }

    /// Like [`fetch_model`](Self::fetch_model), for async code: waits without
    /// blocking the executor, and moves bytes on tokio's blocking pool.
    /// Dropping the future gives its turn back (requires the `tokio` feature).
    #[cfg(feature = "tokio")]
    pub async fn fetch_model_async<T: Send + Sync + 'static>(&self, id: &str) -> Result<ExclusiveGuard<T>> {
        let m = self.typed::<T>(id)?;
        let deadline = Deadline::after(self.inner.pools.inner.wait_timeout);
        let (mut permit, admit) = self.inner.turn.enter_async(id, deadline).await?;
        let timeout = self.inner.pools.inner.wait_timeout;
        let Admit::Switch { prev } = admit else {
            // Joining the occupant: a hit moves nothing. Otherwise (the
            // occupant was evicted while idle, or its last load failed) the
            // load runs as one task that owns the turn, as a switch does: a
            // load that outlived a dropped future could otherwise put this
            // model back beside the next switch's.
            if let Some(guard) = crate::asyncs::hit_owned(&m) {
                return Ok(ExclusiveGuard { guard, _permit: permit, id: id.to_string() });
            }
            let (guard, permit) = crate::asyncs::blocking(move || -> Result<_> {
                let guard = m.owned_timeout(timeout)?;
                Ok((guard, permit))
            })
            .await??;
            return Ok(ExclusiveGuard { guard, _permit: permit, id: id.to_string() });
        };
        // The switch (offload the previous occupant, load this model) runs as
        // one task on the blocking pool that owns the turn: if this future is
        // dropped meanwhile, the switch still ends before the turn passes on
        // (then the guard and the turn are dropped), so the next switch never
        // races a load that is still under way.
        let prev = prev.map(|p| self.model(&p)).transpose()?;
        let (turn, id_owned) = (self.inner.turn.clone(), id.to_string());
        let (guard, permit) = crate::asyncs::blocking(move || -> Result<_> {
            if let Some(prev) = prev {
                offload_within(&*prev, deadline)?;
            }
            turn.occupy(&id_owned);
            let guard = m.owned_timeout(timeout)?;
            permit.switched();
            Ok((guard, permit))
        })
        .await??;
        Ok(ExclusiveGuard { guard, _permit: permit, id: id.to_string() })
    }

    fn model(&self, id: &str) -> Result<Arc<dyn Model>> {
        let models = self.inner.models.read();
        models.get(id).cloned().ok_or_else(|| Error::UnknownModel {
            id: id.to_string(),
            known: models.keys().cloned().collect(),
        })
    }

    fn typed<T: 'static>(&self, id: &str) -> Result<Managed<T>> {
        let m = self.model(id)?;
        m.as_any().downcast_ref::<Managed<T>>().cloned().ok_or_else(|| Error::WrongModelType {
            id: id.to_string(),
            requested: crate::error::short_type(std::any::type_name::<T>()),
            actual: crate::error::short_type(m.type_name()),
        })
    }

    /// The ids of the models, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.inner.models.read().keys().cloned().collect()
    }

    /// The shared device's location.
    pub fn location(&self) -> Location {
        self.inner.location
    }

    /// Where a model's weights are now (the shared location while it is the
    /// occupant, else `Cpu` or `Disk`).
    pub fn model_location(&self, id: &str) -> Result<Location> {
        Ok(self.model(id)?.location())
    }

    /// The instance the models are registered with.
    pub fn pools(&self) -> &ResourcePoolManagement {
        &self.inner.pools
    }
}

impl fmt::Debug for SharedModelManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedModelManager")
            .field("location", &self.inner.location)
            .field("models", &self.ids())
            .finish_non_exhaustive()
    }
}

/// Offloads the previous occupant, waiting (until `deadline`) for a use that
/// is still being given back (a cancelled fetch's load finishing).
fn offload_within(m: &dyn Model, deadline: Deadline) -> Result<()> {
    loop {
        match m.offload() {
            Err(Error::InUse { .. }) if !deadline.passed() => std::thread::sleep(Duration::from_millis(1)),
            r => return r,
        }
    }
}

/// A model of a [`SharedModelManager`] on the shared device, and the device's
/// exclusive use: no other model of the manager can be loaded there until this
/// guard (and every other guard on the same model) is dropped. Dereferences to
/// the model; dropping it (also by a panic unwinding) gives the turn back.
#[must_use = "the shared device is given to the next model as soon as the guard is dropped"]
pub struct ExclusiveGuard<T> {
    // Field order is drop order: the model's use is released before the turn,
    // so the next occupant always finds this one idle.
    guard: OwnedGuard<T>,
    _permit: Permit,
    id: String,
}

impl<T> ExclusiveGuard<T> {
    /// The device the model's weights are on: move inputs here.
    pub fn device(&self) -> Device {
        self.guard.device()
    }

    /// The model's id in its manager.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl<T> Deref for ExclusiveGuard<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> fmt::Debug for ExclusiveGuard<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExclusiveGuard").field("id", &self.id).field("device", &self.device()).finish()
    }
}

// ------------------------------------------------------------------ the turnstile

/// Who may use the shared device: a FIFO queue of fetches, each admitted when
/// it reaches the head and either nobody holds the device or the holders use
/// the same model (and no switch is under way).
#[derive(Default)]
struct Turnstile {
    state: Mutex<TurnState>,
    cond: Condvar,
    #[cfg(feature = "tokio")]
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct TurnState {
    queue: VecDeque<(u64, String)>,
    next_ticket: u64,
    /// The admitted fetches not yet dropped, one entry each: the thread of a
    /// blocking fetch, `None` for an async one (a task may run on any thread,
    /// so it never counts as nested).
    holders: Vec<Option<ThreadId>>,
    /// The model the holders use.
    current: Option<String>,
    /// The first holder is offloading the previous occupant and loading `current`.
    switching: bool,
    /// The model that may be on the shared device (`None`: none is).
    resident: Option<String>,
}

/// What an admitted fetch must do.
enum Admit {
    /// The device is this model's already (in use or idle): just take a guard.
    Join,
    /// Offload `prev` (if any), then load.
    Switch { prev: Option<String> },
}

impl Turnstile {
    fn wake(&self) {
        self.cond.notify_all();
        #[cfg(feature = "tokio")]
        self.notify.notify_waiters();
    }

    fn take_ticket(&self, st: &mut TurnState, id: &str) -> u64 {
        let t = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back((t, id.to_string()));
        t
    }

    /// Admits `ticket` if it may go now: at the head of the queue when the
    /// device is free or used by the same model (and no switch is under way),
    /// or at once when this thread already holds the model in use (a nested
    /// fetch must not wait behind a fetch that waits for it).
    fn try_admit(&self, st: &mut TurnState, ticket: u64, me: Option<ThreadId>) -> Option<Admit> {
        let pos = st.queue.iter().position(|(t, _)| *t == ticket)?;
        let id = &st.queue[pos].1;
        let same = !st.switching && st.current.as_ref() == Some(id);
        let nested = same && me.is_some() && st.holders.contains(&me);
        if !nested && (pos != 0 || (!st.holders.is_empty() && !same)) {
            return None;
        }
        let (_, id) = st.queue.remove(pos).expect("queued");
        st.holders.push(me);
        let admit = if st.holders.len() == 1 && st.resident.as_ref() != Some(&id) {
            st.switching = true;
            Admit::Switch { prev: st.resident.clone() }
        } else {
            Admit::Join
        };
        st.current = Some(id);
        Some(admit)
    }

    fn permit(self: &Arc<Self>, admit: &Admit, holder: Option<ThreadId>) -> Permit {
        Permit { turn: self.clone(), switching: matches!(admit, Admit::Switch { .. }), holder }
    }

    /// The error of a fetch that waited for its turn until `deadline`.
    fn gave_up(&self, id: &str, st: &TurnState) -> Error {
        Error::InUse {
            model: st.current.clone().unwrap_or_else(|| id.to_string()),
            guards: st.holders.len() as u64,
        }
    }

    fn enter_blocking(self: &Arc<Self>, id: &str, deadline: Deadline) -> Result<(Permit, Admit)> {
        let me = Some(std::thread::current().id());
        let mut st = self.state.lock();
        let ticket = self.take_ticket(&mut st, id);
        let mut last = false;
        loop {
            // Admitted even by the last look after the deadline: an admission
            // is never taken and then dropped.
            if let Some(admit) = self.try_admit(&mut st, ticket, me) {
                drop(st);
                self.wake(); // the next in line may join
                return Ok((self.permit(&admit, me), admit));
            }
            if last {
                st.queue.retain(|(t, _)| *t != ticket);
                let err = self.gave_up(id, &st);
                drop(st);
                self.wake(); // the head may have changed
                return Err(err);
            }
            last = match deadline.instant() {
                Some(at) => self.cond.wait_until(&mut st, at).timed_out(),
                None => {
                    self.cond.wait(&mut st);
                    false
                }
            };
        }
    }

    #[cfg(feature = "tokio")]
    async fn enter_async(self: &Arc<Self>, id: &str, deadline: Deadline) -> Result<(Permit, Admit)> {
        let ticket = self.take_ticket(&mut self.state.lock(), id);
        let mut queued = Queued { turn: self, ticket, admitted: false };
        let until = deadline.instant().map(tokio::time::Instant::from_std);
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let admitted = {
                let mut st = self.state.lock();
                self.try_admit(&mut st, ticket, None)
            };
            if let Some(admit) = admitted {
                queued.admitted = true;
                self.wake();
                return Ok((self.permit(&admit, None), admit));
            }
            match until {
                Some(at) => {
                    if tokio::time::timeout_at(at, notified).await.is_err() {
                        let st = self.state.lock();
                        return Err(self.gave_up(id, &st)); // `queued` leaves the queue
                    }
                }
                None => notified.await,
            }
        }
    }

    /// `id` may be on the device from now on (its load is starting): the
    /// previous occupant has left it.
    fn occupy(&self, id: &str) {
        self.state.lock().resident = Some(id.to_string());
    }
}

/// An async fetch's place in the queue; dropping the future removes it.
#[cfg(feature = "tokio")]
struct Queued<'a> {
    turn: &'a Turnstile,
    ticket: u64,
    admitted: bool,
}

#[cfg(feature = "tokio")]
impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.admitted {
            self.turn.state.lock().queue.retain(|(t, _)| *t != self.ticket);
            self.turn.wake(); // the head may have changed
        }
    }
}

/// An admitted fetch's hold on the device.
struct Permit {
    turn: Arc<Turnstile>,
    /// This holder is switching the device to its model (and has not finished).
    switching: bool,
    /// How it is counted among the holders (see `TurnState::holders`).
    holder: Option<ThreadId>,
}

impl Permit {
    /// The model is loaded and guarded: others wanting it may join.
    fn switched(&mut self) {
        if !std::mem::take(&mut self.switching) {
            return;
        }
        self.turn.state.lock().switching = false;
        self.turn.wake();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.turn.state.lock();
        if let Some(i) = st.holders.iter().position(|t| *t == self.holder) {
            st.holders.swap_remove(i);
        }
        if self.switching {
            st.switching = false; // the switch failed or was cancelled
        }
        drop(st);
        self.turn.wake();
    }
}

#[cfg(test)]
mod tests {
    //! Regressions for the findings of the rebuild's review: the turnstile's
    //! admission at the deadline, async fetches and variant guards never
    //! "nested" by thread, a cancelled switch that ends before the next.
    use super::*;
    #[cfg(feature = "tokio")]
    use crate::{EventKind, ResourcePoolManagement, TensorSet};
    #[cfg(feature = "tokio")]
    use tch::{kind::FLOAT_CPU, Tensor};

    /// The holder's drop (here stretched) holds the turnstile's lock across the
    /// waiter's deadline: the waiter wakes timed out, the final `try_admit`
    /// admits it, and its result is thrown away.
    #[test]
    fn an_admission_at_the_deadline_is_not_leaked() {
        let turn = Arc::new(Turnstile::default());
        let (p1, _) = turn.enter_blocking("a", Deadline::after(Duration::from_secs(5))).unwrap();
        let t = turn.clone();
        let waiter = std::thread::spawn(move || {
            t.enter_blocking("b", Deadline::after(Duration::from_millis(100))).map(drop).is_ok()
        });
        std::thread::sleep(Duration::from_millis(30));
        {
            let mut st = turn.state.lock();
            std::thread::sleep(Duration::from_millis(300)); // the waiter's deadline passes
            let me = std::thread::current().id();
            let i = st.holders.iter().position(|x| *x == Some(me)).unwrap();
            st.holders.swap_remove(i); // what `Permit::drop` does
        }
        std::mem::forget(p1);
        turn.wake();
        let ok = waiter.join().unwrap();
        let (holders, switching) = {
            let st = turn.state.lock();
            (st.holders.len(), st.switching)
        };
        let next = turn.enter_blocking("c", Deadline::after(Duration::from_millis(200))).is_ok();
        assert!(
            ok || (holders == 0 && next),
            "fetch of b failed but left {holders} holder(s), switching={switching}; later fetch of c admitted: {next}"
        );
    }

    #[cfg(feature = "tokio")]
    fn w(v: f64) -> TensorSet {
        TensorSet::new([("w", Tensor::full([4], v, FLOAT_CPU))]).unwrap()
    }

    /// CPU + disk pools (no environment) with a 2 s wait timeout.
    #[cfg(feature = "tokio")]
    fn cpu_pools() -> (ResourcePoolManagement, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let pools = ResourcePoolManagement::builder()
            .cuda(false)
            .env(false)
            .spill_dir(dir.path())
            .wait_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        (pools, dir)
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn an_async_fetch_on_the_holders_thread_does_not_jump_the_queue() {
        let (pools, _dir) = cpu_pools();
        let shared = SharedModelManager::with_pools(pools);
        let a = shared.add(w(1.0)).unwrap();
        let b = shared.add(w(2.0)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let g1 = shared.fetch_model_async::<TensorSet>(&a).await.unwrap();
            let (s, b2) = (shared.clone(), b.clone());
            let other = std::thread::spawn(move || s.fetch_model::<TensorSet>(&b2).map(drop));
            tokio::time::sleep(Duration::from_millis(100)).await; // `b` is queued
            let (s2, a2) = (shared.clone(), a.clone());
            let second = tokio::spawn(async move { s2.fetch_model_async::<TensorSet>(&a2).await.map(drop) });
            let jumped = tokio::time::timeout(Duration::from_millis(100), second).await.is_ok();
            drop(g1);
            let _ = tokio::task::spawn_blocking(move || other.join()).await;
            assert!(!jumped, "another task's fetch of `a` was admitted ahead of the queued fetch of `b`");
        });
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn an_async_variant_guard_does_not_jump_a_queued_variant() {
        use crate::Commit;
        let (pools, _dir) = cpu_pools();
        let m = pools.manage(w(0.0)).unwrap();
        let a = m.variant();
        a.commit(Commit::delta("w", Tensor::ones([4], FLOAT_CPU))).unwrap();
        let b = m.variant();
        b.commit(Commit::delta("w", Tensor::full([4], 2.0, FLOAT_CPU))).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let g1 = crate::auto_manage_async(&a).await.unwrap(); // admitted on the blocking thread
            let b2 = b.clone();
            let other =
                std::thread::spawn(move || crate::auto_manage_timeout(&b2, Duration::from_secs(2)).map(drop));
            tokio::time::sleep(Duration::from_millis(100)).await; // `b` is queued
            let a2 = a.clone();
            let second = tokio::spawn(async move { crate::auto_manage_async(&a2).await.map(drop) });
            let jumped = tokio::time::timeout(Duration::from_millis(100), second).await.is_ok();
            drop(g1);
            let _ = std::thread::spawn(move || other.join()).join();
            assert!(!jumped, "another task's guard on variant a was admitted ahead of the queued variant b");
        });
    }

    /// A fetch cancelled while its load attempt makes room (evicting another
    /// model) lets the next switch find its model off the device; the orphaned
    /// attempt then loads it anyway.
    ///
    /// A listener holds the attempt at the eviction it makes (the event is
    /// delivered on the evicting thread), so the fetch is cancelled while the
    /// attempt is known to be running, whatever the machine's speed.
    #[cfg(feature = "tokio")]
    #[test]
    fn a_fetch_cancelled_while_making_room_leaves_one_model() {
        use std::sync::{Arc, Condvar, Mutex};
        const MIB: i64 = 1 << 20;
        // (the attempt reached the eviction, the gate is open)
        let gate = Arc::new((Mutex::new((false, false)), Condvar::new()));
        let victim = Arc::new(Mutex::new(String::new()));
        let dir = tempfile::tempdir().unwrap();
        let (g2, v2) = (gate.clone(), victim.clone());
        let pools = ResourcePoolManagement::builder()
            .cuda(false)
            .env(false)
            .cpu_budget((16 + 6) << 20)
            .spill_dir(dir.path())
            .wait_timeout(Duration::from_secs(60))
            .listener(move |e| {
                if e.kind == EventKind::Offloaded && *v2.lock().unwrap() == e.model {
                    let (m, cv) = &*g2;
                    let mut st = m.lock().unwrap();
                    st.0 = true;
                    cv.notify_all();
                    let _ = cv.wait_timeout_while(st, Duration::from_secs(60), |s| !s.1).unwrap();
                }
            })
            .build()
            .unwrap();
        let shared = SharedModelManager::with_pools(pools.clone());
        let big = |n: i64| TensorSet::new([("w", Tensor::ones([n * MIB / 4], FLOAT_CPU))]).unwrap();
        let b = shared.add(big(8)).unwrap();
        let c = shared.add(big(8)).unwrap();
        let x = pools.manage(big(16)).unwrap(); // idle, resident (b and c made room): b's load must evict it
        assert_eq!(x.location(), Location::Cpu);
        *victim.lock().unwrap() = x.name().to_owned();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let fetch = shared.fetch_model_async::<TensorSet>(&b);
            tokio::pin!(fetch);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                tokio::select! {
                    r = &mut fetch => panic!("the fetch of b ended ({:?}) before it evicted x", r.map(drop)),
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
                if gate.0.lock().unwrap().0 {
                    break; // the attempt is held at x's eviction: cancel the fetch
                }
                assert!(tokio::time::Instant::now() < deadline, "the fetch of b never evicted x");
            }
        });
        let opener = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200)); // c's fetch starts while b's attempt runs
                let (m, cv) = &*gate;
                m.lock().unwrap().1 = true;
                cv.notify_all();
            })
        };
        let g = shared.fetch_model::<TensorSet>(&c).unwrap();
        opener.join().unwrap();
        std::thread::sleep(Duration::from_millis(500)); // the orphaned attempt ends
        let (lb, lc) = (shared.model_location(&b).unwrap(), shared.model_location(&c).unwrap());
        drop(g);
        assert!(!(lb == Location::Cpu && lc == Location::Cpu), "b and c both on the shared device (cpu)");
    }
}
