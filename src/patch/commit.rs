//! Commits: patch stacks on managed models, exact reverts, and variants that
//! share one copy of the base weights.
//!
//! # Model
//!
//! Every handle family (a [`Managed`] and its clones) has a *desired* stack of
//! commits ([`Stack`]). A model has one *applied* state, on its runtime copy
//! ([`Patches`], inside the engine's per-model data). `commit`, `revert` and
//! `revert_to` only validate and edit the desired stack; a guard makes the
//! applied state equal to its handle's desired stack before it returns (a
//! *rebase*), and that state then holds for the guard's whole life.
//!
//! # Exclusion
//!
//! Guards on a model that has commits (or variants) go through a small
//! per-model lock ([`ModelCommits`]): guards whose desired stacks are equal
//! share the model; a guard wanting another stack waits until no guard of the
//! model is alive, then rebases and takes over. Waiters queue: when the model
//! is released, a waiting guard goes before newcomers. A model that never had a
//! commit or a variant skips all of this (one atomic load more on the hit path).
//! The switch to that path is a Dekker handshake: `commit` stores `active`
//! before a rebase reads the use count, a plain guard increments the use count
//! before it reads `active` (all `SeqCst`), so a plain guard either backs off
//! or is seen by the rebase, which then waits for it to drop.
//!
//! # Exact revert
//!
//! Base weights are never written. The first patch on a weight gives it a fresh
//! buffer on the runtime device (`set_data`), computed from the base, and keeps
//! the base tensor; reverting the weight to "no patch" points it back at the
//! base, so it is bit-identical, and reverting one of several patches recomputes
//! the buffer from the base by replaying the remaining patches in order (never a
//! subtraction). Each patch is applied in at least f32 and rounded to the
//! weight's dtype, so replaying and applying incrementally agree bit for bit.
//! `set_data` keeps the weight's own version counter, so the engine's dirty
//! checks never mistake a patch for a user write: an eviction first points
//! every weight back at its base ([`unpatch`]) and then offloads or spills the
//! base, which is therefore written at most once. The next guard replays the
//! stack. Closure commits are not weights: eviction leaves them applied.
//!
//! Patch buffers are charged to the runtime pool (`ModelCore::patch_bytes`):
//! a rebase that patches more weights makes room first (evicting idle models,
//! or waiting), and fails with `OutOfMemory` without changing anything if it
//! cannot.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tch::{Device, Kind, Tensor};

use crate::manager::{Inner, ModelCore, Wait};
use crate::user::Group;
use crate::{Error, Result};

/// The error type closure commits return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type ClosureFn = Arc<dyn Fn() -> std::result::Result<(), BoxError> + Send + Sync>;

/// Identifies a commit on a model's stack (unique in the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(u64);

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

static NEXT_COMMIT: AtomicU64 = AtomicU64::new(1);

/// A change to a managed model: LoRA factors, a weight delta, a replacement
/// weight, a pair of apply/revert closures, or several of these squashed into
/// one unit. Push it with [`Managed::commit`](crate::Managed::commit).
///
/// Weight changes are exact and deterministic: each one is computed in f32
/// (f64 for f64 weights) and rounded to the weight's dtype once, in commit
/// order. The tensors are moved to the model's runtime device when applied;
/// they must not be modified after the commit (the commit keeps a handle, not a
/// copy, and replays them on every rebase).
///
/// ```
/// use sire::Commit;
/// use tch::{Kind, Tensor};
///
/// let a = Tensor::randn([4, 16], (Kind::Float, tch::Device::Cpu)); // [rank, in]
/// let b = Tensor::randn([8, 4], (Kind::Float, tch::Device::Cpu)); // [out, rank]
/// let c = Commit::squash([
///     Commit::lora("fc.weight", a, b, 0.5),
///     Commit::delta("fc.bias", Tensor::ones([8], (Kind::Float, tch::Device::Cpu))),
/// ])
/// .named("style");
/// assert_eq!(c.targets().collect::<Vec<_>>(), ["fc.weight", "fc.bias"]);
/// ```
#[must_use = "a commit does nothing until pushed with Managed::commit"]
pub struct Commit {
    label: String,
    parts: Vec<Part>,
}

enum Part {
    Weight { target: String, op: WeightOp },
    Closure { apply: ClosureFn, revert: ClosureFn },
}

/// A tensor a commit reads and never writes.
struct Frozen(Tensor);

// SAFETY: `Tensor` is `Send` but not `Sync` because some of its `&self`
// methods have interior effects. A `Frozen` tensor is only ever read, through
// out-of-place operations (`to_device`, `to_kind`, `mm`, `reshape`, reading it
// as the source of a copy into another tensor), which libtorch allows from any
// number of threads at once, exactly like concurrent reads of a `Send` tensor.
unsafe impl Sync for Frozen {}

enum WeightOp {
    /// `W += (scale * B) @ A`, A `[r, in...]`, B `[out, r...]`.
    Lora {
        a: Frozen,
        b: Frozen,
        scale: f64,
    },
    Delta(Frozen),
    Replace(Frozen),
}

fn frozen(t: Tensor) -> Frozen {
    Frozen(t.detach())
}

impl Commit {
    /// A LoRA update of weight `target`: `W += scale · (B · A)`, with `a` the
    /// down projection (`lora_A`, shape `[rank, in]`) and `b` the up projection
    /// (`lora_B`, `[out, rank]`). Convolution factors (`[rank, in, kh, kw]`,
    /// `[out, rank, 1, 1]`) are flattened and the product reshaped to the weight.
    /// Give the effective scale: LoRA files use `multiplier · alpha / rank`
    /// ([`Lora`](crate::Lora) computes it).
    ///
    /// Exactly: `Δ = (scale·B)·A` in f32 (f64 for f64 weights; the scaled
    /// factor rounded, then the product), then `W ← W + Δ` in f32, rounded to
    /// W's dtype.
    pub fn lora(target: impl Into<String>, a: Tensor, b: Tensor, scale: f64) -> Commit {
        let target = target.into();
        Commit {
            label: format!("lora {target}"),
            parts: vec![Part::Weight { target, op: WeightOp::Lora { a: frozen(a), b: frozen(b), scale } }],
        }
    }

    /// Adds `delta` (same shape as the weight) to weight `target`:
    /// `W ← W + delta` in f32, rounded to W's dtype.
    pub fn delta(target: impl Into<String>, delta: Tensor) -> Commit {
        let target = target.into();
        Commit {
            label: format!("delta {target}"),
            parts: vec![Part::Weight { target, op: WeightOp::Delta(frozen(delta)) }],
        }
    }

    /// Replaces weight `target` with `value` (same shape, converted to W's dtype).
    pub fn replace(target: impl Into<String>, value: Tensor) -> Commit {
        let target = target.into();
        Commit {
            label: format!("replace {target}"),
            parts: vec![Part::Weight { target, op: WeightOp::Replace(frozen(value)) }],
        }
    }

    /// A change that is not a weight: `apply` when the commit comes onto the
    /// model, `revert` when it leaves (newest first). Both run inside the guard
    /// that rebases the model; an error there fails that guard, and the model is
    /// left as it was before (commits applied by that rebase are reverted).
    /// Eviction does not revert closures: they do not touch weights.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    ///
    /// let flag = Arc::new(AtomicBool::new(false));
    /// let (on, off) = (flag.clone(), flag.clone());
    /// let c = sire::Commit::closure(
    ///     "fast mode",
    ///     move || -> Result<(), std::io::Error> { Ok(on.store(true, Ordering::SeqCst)) },
    ///     move || -> Result<(), std::io::Error> { Ok(off.store(false, Ordering::SeqCst)) },
    /// );
    /// # let _ = c;
    /// ```
    pub fn closure<A, R, EA, ER>(label: impl Into<String>, apply: A, revert: R) -> Commit
    where
        A: Fn() -> std::result::Result<(), EA> + Send + Sync + 'static,
        R: Fn() -> std::result::Result<(), ER> + Send + Sync + 'static,
        EA: Into<BoxError>,
        ER: Into<BoxError>,
    {
        Commit {
            label: label.into(),
            parts: vec![Part::Closure {
                apply: Arc::new(move || apply().map_err(Into::into)),
                revert: Arc::new(move || revert().map_err(Into::into)),
            }],
        }
    }

    /// Several commits as one: applied in order, validated together, reverted
    /// as one unit, one id.
    pub fn squash(commits: impl IntoIterator<Item = Commit>) -> Commit {
        let mut labels = Vec::new();
        let mut parts = Vec::new();
        for c in commits {
            labels.push(c.label);
            parts.extend(c.parts);
        }
        Commit { label: format!("squash({})", labels.join(", ")), parts }
    }

    /// Sets the label shown by [`Managed::commits`](crate::Managed::commits) and in errors.
    pub fn named(mut self, label: impl Into<String>) -> Commit {
        self.label = label.into();
        self
    }

    /// The weights this commit changes, in order (a weight may appear twice).
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Weight { target, .. } => Some(target.as_str()),
            Part::Closure { .. } => None,
        })
    }
}

impl fmt::Debug for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Commit")
            .field("label", &self.label)
            .field("targets", &self.targets().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// One commit on a handle's stack, as listed by [`Managed::commits`](crate::Managed::commits).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommitInfo {
    /// Its id (for [`Managed::revert_to`](crate::Managed::revert_to)).
    pub id: CommitId,
    /// Its label.
    pub label: String,
    /// The weights it changes, in order.
    pub targets: Vec<String>,
    /// How many closure pairs it holds.
    pub closures: usize,
}

// --------------------------------------------------------------------- records

/// A validated commit, resolved against a model's inventory. Immutable and
/// shared between the stacks of a model's variants.
pub(crate) struct CommitRecord {
    id: CommitId,
    label: String,
    parts: Vec<RecPart>,
}

enum RecPart {
    Weight { group: usize, target: String, op: WeightOp },
    Closure { apply: ClosureFn, revert: ClosureFn },
}

impl CommitRecord {
    pub(crate) fn id(&self) -> CommitId {
        self.id
    }

    fn info(&self) -> CommitInfo {
        let mut targets = Vec::new();
        let mut closures = 0;
        for p in &self.parts {
            match p {
                RecPart::Weight { target, .. } => targets.push(target.clone()),
                RecPart::Closure { .. } => closures += 1,
            }
        }
        CommitInfo { id: self.id, label: self.label.clone(), targets, closures }
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.label, self.id)
    }
}

/// A stack of commits, oldest first, as one shared snapshot.
pub(crate) type Snapshot = Arc<Vec<Arc<CommitRecord>>>;

fn same_stack(a: &[Arc<CommitRecord>], b: &[Arc<CommitRecord>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.id == y.id)
}

/// The names, shapes and dtypes of a model's weights (known without loading).
pub(crate) struct Index {
    by_name: HashMap<String, usize>,
    names: Vec<String>,
    shapes: Vec<(Vec<i64>, Kind)>,
}

impl Index {
    fn build(groups: &[Group]) -> Index {
        let mut by_name = HashMap::new();
        let mut names = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            for n in &g.names {
                by_name.insert(n.clone(), i);
                names.push(n.clone());
            }
        }
        let shapes = groups.iter().map(|g| (g.shape.clone(), g.kind)).collect();
        Index { by_name, names, shapes }
    }

    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }
}

fn is_float(k: Kind) -> bool {
    matches!(k, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double)
}

/// Validates a commit against a model's inventory: every name, shape and dtype
/// is checked before anything is pushed (nothing is applied here).
pub(crate) fn resolve(model: &str, index: &Index, c: Commit) -> Result<CommitRecord> {
    let invalid = |reason: String| Error::InvalidCommit { model: model.into(), reason };
    let mut parts = Vec::with_capacity(c.parts.len());
    for p in c.parts {
        match p {
            Part::Closure { apply, revert } => parts.push(RecPart::Closure { apply, revert }),
            Part::Weight { target, op } => {
                let Some(&group) = index.by_name.get(&target) else {
                    return Err(Error::UnknownTensor { model: model.into(), name: target });
                };
                let (shape, kind) = &index.shapes[group];
                if !is_float(*kind) {
                    return Err(invalid(format!(
                        "tensor `{target}` is {kind:?}: only floating weights can be patched"
                    )));
                }
                let mismatch = |found: Vec<i64>| Error::ShapeMismatch {
                    model: model.into(),
                    name: target.clone(),
                    expected: shape.clone(),
                    found,
                };
                let check_float = |what: &str, t: &Tensor| {
                    if is_float(t.kind()) {
                        Ok(())
                    } else {
                        Err(invalid(format!("{what} for `{target}` is {:?}, not a floating dtype", t.kind())))
                    }
                };
                match &op {
                    WeightOp::Delta(t) | WeightOp::Replace(t) => {
                        check_float("the tensor", &t.0)?;
                        if &t.0.size() != shape {
                            return Err(mismatch(t.0.size()));
                        }
                    }
                    WeightOp::Lora { a, b, scale } => {
                        check_float("lora A", &a.0)?;
                        check_float("lora B", &b.0)?;
                        if !scale.is_finite() {
                            return Err(invalid(format!("LoRA scale {scale} for `{target}` is not finite")));
                        }
                        let (sa, sb) = (a.0.size(), b.0.size());
                        let rank = sa.first().copied().unwrap_or(0);
                        let out = sb.first().copied().unwrap_or(0);
                        let factors_ok = sa.len() >= 2
                            && sb.len() >= 2
                            && rank > 0
                            && sb[1] == rank
                            && sb[2..].iter().all(|&d| d == 1);
                        if !factors_ok {
                            return Err(invalid(format!(
                                "LoRA factors for `{target}` do not chain: A is {sa:?} ([rank, in]), B is {sb:?} ([out, rank])"
                            )));
                        }
                        let inner: i64 = sa[1..].iter().product();
                        let numel: i64 = shape.iter().product();
                        if shape.first() != Some(&out) || out * inner != numel {
                            return Err(mismatch(vec![out, inner]));
                        }
                    }
                }
                parts.push(RecPart::Weight { group, target, op });
            }
        }
    }
    Ok(CommitRecord { id: CommitId(NEXT_COMMIT.fetch_add(1, Relaxed)), label: c.label, parts })
}

// --------------------------------------------------------------------- stacks

/// The desired stack of one handle family (a `Managed` and its clones).
#[derive(Default)]
pub(crate) struct Stack {
    commits: Mutex<Snapshot>,
}

impl Stack {
    pub(crate) fn fork(&self) -> Stack {
        Stack { commits: Mutex::new(self.snapshot()) }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        self.commits.lock().clone()
    }

    pub(crate) fn push(&self, rec: CommitRecord) {
        let mut s = self.commits.lock();
        let mut v = Vec::clone(&s);
        v.push(Arc::new(rec));
        *s = Arc::new(v);
    }

    pub(crate) fn pop(&self) -> Option<CommitId> {
        let mut s = self.commits.lock();
        let mut v = Vec::clone(&s);
        let id = v.pop()?.id;
        *s = Arc::new(v);
        Some(id)
    }

    /// Keeps the commits up to and including `id`; `None` empties the stack.
    /// Returns whether `id` was found.
    pub(crate) fn truncate(&self, id: Option<CommitId>) -> bool {
        let mut s = self.commits.lock();
        let keep = match id {
            None => 0,
            Some(id) => match s.iter().position(|r| r.id == id) {
                Some(i) => i + 1,
                None => return false,
            },
        };
        if keep < s.len() {
            *s = Arc::new(s[..keep].to_vec());
        }
        true
    }

    pub(crate) fn infos(&self) -> Vec<CommitInfo> {
        self.snapshot().iter().map(|r| r.info()).collect()
    }
}

// --------------------------------------------------------------------- variant lock

/// Per-model state shared by all handles and variants.
#[derive(Default)]
pub(crate) struct ModelCommits {
    /// Set once the model has a commit or a variant: guards then take the slow path.
    active: AtomicBool,
    /// Guards admitted through `lock` that hold a use of the model.
    engaged: AtomicU64,
    lock: Mutex<Admission>,
    cond: Condvar,
    index: OnceLock<Index>,
}

#[derive(Default)]
struct Admission {
    /// Guards admitted (all want `current`).
    holders: u64,
    /// Guards waiting for the model to be free.
    waiting: u64,
    current: Option<Snapshot>,
}

impl ModelCommits {
    /// Whether guards must take the commit path (cheap check before a plain guard).
    #[inline]
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Relaxed)
    }

    /// The same, ordered after the caller's use-count increment (see the module docs).
    #[inline]
    pub(crate) fn is_active_after_acquire(&self) -> bool {
        self.active.load(SeqCst)
    }

    pub(crate) fn activate(&self) {
        self.active.store(true, SeqCst);
    }

    pub(crate) fn index(&self, core: &ModelCore) -> &Index {
        self.index.get_or_init(|| core.with_weights(|groups, _| Index::build(groups)))
    }

    /// Admits a guard wanting `desired`: at once if the model is free or held by
    /// guards wanting the same stack, else after every guard of the model drops.
    fn admit(&self, model: &str, desired: &Snapshot, wait: Wait) -> Result<()> {
        let mut s = self.lock.lock();
        let mut queued = false;
        let res = loop {
            let joins = s.holders > 0 && s.current.as_ref().is_some_and(|c| same_stack(c, desired));
            // A free model goes to a queued waiter before a newcomer (no starvation),
            // except for calls that may not wait at all.
            let takes = s.holders == 0 && (queued || s.waiting == 0 || matches!(wait, Wait::No));
            if joins || takes {
                break Ok(());
            }
            let deadline = match wait {
                Wait::Until(d, _) if Instant::now() < d => d,
                _ => break Err(Error::InUse { model: model.into(), guards: s.holders }),
            };
            if !queued {
                queued = true;
                s.waiting += 1;
            }
            self.cond.wait_until(&mut s, deadline);
        };
        if queued {
            s.waiting -= 1;
        }
        match res {
            Ok(()) => {
                if s.holders == 0 {
                    s.current = Some(desired.clone());
                    if s.waiting > 0 {
                        self.cond.notify_all(); // waiters wanting the same stack can join
                    }
                }
                s.holders += 1;
            }
            // Others may have queued behind this one while the model was free.
            Err(_) if s.holders == 0 && s.waiting > 0 => {
                self.cond.notify_all();
            }
            Err(_) => {}
        }
        res
    }

    fn leave(&self) {
        let mut s = self.lock.lock();
        s.holders -= 1;
        if s.holders == 0 && s.waiting > 0 {
            self.cond.notify_all();
        }
    }
}

/// Takes a use of the model with `stack` applied on it (the guard slow path).
/// On `Ok` the caller must call [`release`].
pub(crate) fn acquire(
    inner: &Inner,
    core: &Arc<ModelCore>,
    mc: &ModelCommits,
    stack: &Stack,
    wait: Wait,
) -> Result<()> {
    let desired = stack.snapshot();
    mc.admit(&core.name, &desired, wait)?;
    if let Err(e) = inner.acquire(core, wait) {
        mc.leave();
        return Err(e);
    }
    mc.engaged.fetch_add(1, SeqCst);
    match sync(inner, core, mc, &desired, wait) {
        Ok(()) => Ok(()),
        Err(e) => {
            release(inner, core, mc);
            Err(e)
        }
    }
}

/// Gives back a use taken by [`acquire`].
pub(crate) fn release(inner: &Inner, core: &ModelCore, mc: &ModelCommits) {
    mc.engaged.fetch_sub(1, SeqCst);
    inner.release(core);
    mc.leave();
}

/// Brings the applied state to `desired`. Runs with a use of the model held and
/// the variant lock admitted for `desired`.
fn sync(inner: &Inner, core: &ModelCore, mc: &ModelCommits, desired: &Snapshot, wait: Wait) -> Result<()> {
    let mut pause = Duration::from_micros(50);
    loop {
        let done = core.with_weights(|groups, p| -> Result<bool> {
            if p.synced.as_ref().is_some_and(|s| same_stack(s, desired)) {
                return Ok(true);
            }
            // Guards taken before the model's first commit did not come through the
            // variant lock: wait for them to drop before changing the weights.
            if core.uses() > mc.engaged.load(SeqCst) {
                return Ok(false);
            }
            rebase(
                &core.name,
                groups,
                p,
                desired,
                &mut |bytes| inner.set_patch_bytes(core, bytes, wait),
                &mut |bytes| inner.try_grow_patch_bytes(core, bytes),
            )?;
            Ok(true)
        })?;
        if done {
            return Ok(());
        }
        match wait {
            Wait::Until(deadline, _) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            _ => return Err(Error::InUse { model: core.name.clone(), guards: core.uses() - 1 }),
        }
    }
}

// --------------------------------------------------------------------- patches

/// What is applied on a model's runtime copy. Lives in the engine's per-model data.
#[derive(Default)]
pub(crate) struct Patches {
    /// The commits whose closures are applied, oldest first.
    closures: Vec<Arc<CommitRecord>>,
    /// Patched weights, by group.
    groups: HashMap<usize, GroupPatch>,
    /// The stack fully applied now (closures and weights), when known.
    synced: Option<Snapshot>,
}

struct GroupPatch {
    /// The weight before any patch (what the weight points back to on revert).
    base: Tensor,
    /// The patched weight the group points at: owned by the patch machinery.
    buf: Tensor,
    /// The weight parts applied on `buf`, in order.
    ops: Vec<OpRef>,
    /// The buffer of the state applied before (another variant's, typically)
    /// and its ops, kept when the pool had room for it: switching back is then
    /// a pointer swap, not a recomputation. Its bytes are charged too.
    spare: Option<(Tensor, Vec<OpRef>)>,
}

/// Bytes the patch machinery holds: a buffer per patched weight, plus its spare.
fn held(groups: &[Group], p: &Patches) -> u64 {
    p.groups.iter().map(|(&g, gp)| groups[g].bytes * (1 + gp.spare.is_some() as u64)).sum()
}

#[derive(Clone)]
struct OpRef {
    rec: Arc<CommitRecord>,
    part: usize,
}

impl OpRef {
    fn op(&self) -> &WeightOp {
        match &self.rec.parts[self.part] {
            RecPart::Weight { op, .. } => op,
            RecPart::Closure { .. } => unreachable!("an OpRef names a weight part"),
        }
    }
}

fn same_ops(a: &[OpRef], b: &[OpRef]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.rec.id == y.rec.id && x.part == y.part)
}

/// Drops every spare buffer (a cache of the previous state) and returns the
/// bytes freed. The weights are unchanged: spares are never what a weight points at.
pub(crate) fn drop_spares(groups: &[Group], p: &mut Patches) -> u64 {
    let mut freed = 0;
    for (&g, gp) in p.groups.iter_mut() {
        if gp.spare.take().is_some() {
            freed += groups[g].bytes;
        }
    }
    freed
}

/// Points every patched weight back at its base and forgets the patches (the
/// model is leaving its runtime location). Closures stay applied.
pub(crate) fn unpatch(groups: &mut [Group], p: &mut Patches) {
    for (i, gp) in p.groups.drain() {
        groups[i].set_data(&gp.base);
    }
    p.synced = None;
}

enum Action {
    /// Back to the base.
    Unpatch,
    /// Apply the ops after the `n` already on the buffer.
    Extend(usize),
    /// The spare buffer holds exactly the wanted ops: swap it in, compute nothing.
    Swap,
    /// Recompute into the spare buffer from the base, then swap it in (the
    /// current buffer becomes the spare).
    IntoSpare,
    /// Recompute into a new buffer (the current one becomes the spare).
    IntoNew,
    /// Recompute the current buffer from the base, in place (no room for a spare).
    InPlace,
    /// A weight patched for the first time.
    Fresh,
}

/// Makes the applied state equal to `desired`: weights first (computed, not yet
/// visible where new), then closures; on any failure everything done so far is
/// undone and the model is left as it was. `charge` sets the patch bytes
/// charged to the runtime pool.
fn rebase(
    model: &str,
    groups: &mut [Group],
    p: &mut Patches,
    desired: &Snapshot,
    charge: &mut dyn FnMut(u64) -> Result<()>,
    try_charge: &mut dyn FnMut(u64) -> bool,
) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    // The weight ops each group should carry.
    let mut want: BTreeMap<usize, Vec<OpRef>> = BTreeMap::new();
    for rec in desired.iter() {
        for (part, rp) in rec.parts.iter().enumerate() {
            if let RecPart::Weight { group, .. } = rp {
                want.entry(*group).or_default().push(OpRef { rec: rec.clone(), part });
            }
        }
    }
    let touched: BTreeSet<usize> = p.groups.keys().chain(want.keys()).copied().collect();
    let mut plan = Vec::new();
    for g in touched {
        let cur = p.groups.get(&g).map_or(&[][..], |gp| &gp.ops[..]);
        let w = want.get(&g).map_or(&[][..], |v| &v[..]);
        if same_ops(cur, w) {
            continue;
        }
        let spare = p.groups.get(&g).and_then(|gp| gp.spare.as_ref());
        let action = if w.is_empty() {
            Action::Unpatch
        } else if !p.groups.contains_key(&g) {
            Action::Fresh
        } else if spare.is_some_and(|(_, ops)| same_ops(ops, w)) {
            Action::Swap
        } else if !cur.is_empty() && cur.len() < w.len() && same_ops(cur, &w[..cur.len()]) {
            Action::Extend(cur.len())
        } else if spare.is_some() {
            Action::IntoSpare
        } else {
            Action::IntoNew
        };
        plan.push((g, action));
    }

    // Memory first: every weight patched afterwards holds its base and a buffer,
    // and keeps its spare. Those bytes may evict other models or wait...
    let bytes_before = held(groups, p);
    let spare_kept = |g: &usize| p.groups.get(g).is_some_and(|gp| gp.spare.is_some());
    let mut bytes_after: u64 = want.keys().map(|g| groups[*g].bytes * (1 + spare_kept(g) as u64)).sum();
    if bytes_after > bytes_before {
        charge(bytes_after)?;
    }
    // ...a new spare only takes room that is free now; without it the buffer is
    // recomputed in place.
    let mut charged = bytes_before.max(bytes_after);
    for (g, action) in &mut plan {
        if matches!(action, Action::IntoNew) {
            let b = groups[*g].bytes;
            if try_charge(charged + b) {
                charged += b;
                bytes_after += b;
            } else {
                *action = Action::InPlace;
            }
        }
    }

    // Weights. Existing buffers are rewritten in place (the model is ours alone);
    // new ones are only attached once everything succeeded.
    let mut fresh: Vec<(usize, Tensor, Tensor)> = Vec::new();
    let mut news: Vec<(usize, Tensor)> = Vec::new();
    let mut rewritten: Vec<usize> = Vec::new();
    let mut spoiled: Vec<usize> = Vec::new();
    let mut weights = || -> Result<()> {
        for (g, action) in &plan {
            let w = want.get(g).map_or(&[][..], |v| &v[..]);
            match (action, p.groups.get_mut(g)) {
                (Action::Unpatch | Action::Swap, _) => {}
                (Action::Extend(n), Some(gp)) => {
                    rewritten.push(*g);
                    let buf = gp.buf.shallow_clone();
                    compute(&buf, None, &w[*n..])?;
                }
                (Action::IntoSpare, Some(gp)) => {
                    spoiled.push(*g);
                    let (buf, _) = gp.spare.as_ref().expect("planned with a spare");
                    compute(buf, Some(&gp.base), w)?;
                }
                (Action::IntoNew, Some(gp)) => {
                    let buf = Tensor::f_empty(gp.base.size(), (gp.base.kind(), gp.base.device()))?;
                    compute(&buf, Some(&gp.base), w)?;
                    news.push((*g, buf));
                }
                (_, Some(gp)) => {
                    rewritten.push(*g);
                    compute(&gp.buf, Some(&gp.base), w)?;
                }
                (_, None) => {
                    let base = groups[*g].current().detach();
                    let buf = Tensor::f_empty(base.size(), (base.kind(), base.device()))?;
                    compute(&buf, Some(&base), w)?;
                    fresh.push((*g, base, buf));
                }
            }
        }
        Ok(())
    };
    let mut res = weights();

    // Closures: revert what leaves (newest first), apply what comes (in order).
    let mut closure_log: Vec<(ClosureFn, bool)> = Vec::new(); // (inverse to run on rollback, was apply)
    if res.is_ok() {
        res = run_closures(model, &p.closures, desired, &mut closure_log);
    }

    if let Err(e) = res {
        // Undo: closures in reverse, then the weights rewritten in place.
        for (undo, _) in closure_log.iter().rev() {
            if let Err(err) = undo() {
                tracing::warn!(model, error = %err, "could not undo a closure commit during a failed rebase");
            }
        }
        for g in spoiled {
            // Its content no longer matches its ops: drop it.
            p.groups.get_mut(&g).expect("spoiled groups are patched").spare = None;
        }
        for g in rewritten {
            let gp = p.groups.get_mut(&g).expect("rewritten groups are patched");
            if compute(&gp.buf, Some(&gp.base), &gp.ops).is_err() {
                // Cannot rebuild it: fall back to the base, and say what is applied.
                let gp = p.groups.remove(&g).expect("present");
                groups[g].set_data(&gp.base);
                p.synced = None;
            }
        }
        let now = held(groups, p);
        let _ = charge(now);
        return Err(e);
    }

    // Publish (infallible).
    for (g, action) in plan {
        match action {
            Action::Unpatch => {
                let gp = p.groups.remove(&g).expect("unpatch targets a patched group");
                groups[g].set_data(&gp.base);
            }
            Action::Fresh => {} // attached below
            Action::Extend(_) | Action::InPlace => {
                let gp = p.groups.get_mut(&g).expect("patched");
                gp.ops = want.remove(&g).expect("patched groups have ops");
            }
            Action::Swap | Action::IntoSpare => {
                let gp = p.groups.get_mut(&g).expect("patched");
                let (buf, _) = gp.spare.take().expect("planned with a spare");
                let ops = want.remove(&g).expect("patched groups have ops");
                let old = (std::mem::replace(&mut gp.buf, buf), std::mem::replace(&mut gp.ops, ops));
                gp.spare = Some(old);
                groups[g].set_data(&gp.buf);
            }
            Action::IntoNew => {} // attached below
        }
    }
    for (g, buf) in news {
        let gp = p.groups.get_mut(&g).expect("patched");
        let ops = want.remove(&g).expect("patched groups have ops");
        let old = (std::mem::replace(&mut gp.buf, buf), std::mem::replace(&mut gp.ops, ops));
        gp.spare = Some(old);
        groups[g].set_data(&gp.buf);
    }
    for (g, base, buf) in fresh {
        groups[g].set_data(&buf);
        let ops = want.remove(&g).expect("fresh groups have ops");
        p.groups.insert(g, GroupPatch { base, buf, ops, spare: None });
    }
    p.closures = desired.to_vec();
    p.synced = Some(desired.clone());
    debug_assert_eq!(held(groups, p), bytes_after);
    if bytes_after < charged {
        charge(bytes_after)?;
    }
    Ok(())
}

/// Reverts the closures of `applied` that are not in `desired` (newest first)
/// and applies those of `desired` that are not applied, logging inverses.
fn run_closures(
    model: &str,
    applied: &[Arc<CommitRecord>],
    desired: &[Arc<CommitRecord>],
    log: &mut Vec<(ClosureFn, bool)>,
) -> Result<()> {
    let common = applied.iter().zip(desired).take_while(|(a, d)| a.id == d.id).count();
    let failed = |rec: &CommitRecord, action: &'static str, source: BoxError| Error::CommitFailed {
        model: model.into(),
        commit: rec.describe(),
        action,
        source,
    };
    for rec in applied[common..].iter().rev() {
        for part in rec.parts.iter().rev() {
            if let RecPart::Closure { apply, revert } = part {
                revert().map_err(|e| failed(rec, "revert", e))?;
                log.push((apply.clone(), false));
            }
        }
    }
    for rec in &desired[common..] {
        for part in &rec.parts {
            if let RecPart::Closure { apply, revert } = part {
                apply().map_err(|e| failed(rec, "apply", e))?;
                log.push((revert.clone(), true));
            }
        }
    }
    Ok(())
}

/// Writes into `buf` the result of applying `ops` in order to `src` (or to
/// `buf`'s own content when `src` is `None`). `buf` is contiguous, owned by the
/// patch machinery and has the weight's shape, dtype and device.
fn compute(buf: &Tensor, src: Option<&Tensor>, ops: &[OpRef]) -> Result<()> {
    let mut buf = buf.shallow_clone();
    let kind = buf.kind();
    let device = buf.device();
    let shape = buf.size();
    let acc = if kind == Kind::Double { Kind::Double } else { Kind::Float };
    let mut src = src;
    for op in ops {
        let from = src.take();
        match op.op() {
            WeightOp::Replace(v) => {
                buf.f_copy_(&v.0.f_to_device(device)?)?;
            }
            WeightOp::Delta(d) => {
                let d = on(&d.0, device, acc)?;
                add(&mut buf, from, &d, acc)?;
            }
            WeightOp::Lora { a, b, scale } => {
                let rank = a.0.size()[0];
                let out = shape[0];
                let a = on(&a.0, device, acc)?.f_reshape([rank, -1])?;
                let mut b = on(&b.0, device, acc)?.f_reshape([out, rank])?;
                if *scale != 1.0 {
                    b = b.f_mul_scalar(*scale)?; // the small factor: no pass over the weight
                }
                match from {
                    // Straight into the buffer: Δ, then Δ + W (the same sums as W + Δ).
                    Some(w) if kind == acc => {
                        let _ = b.f_mm_out(&buf.f_view([out, -1])?, &a)?;
                        let _ = buf.f_add_(w)?;
                    }
                    _ => add(&mut buf, from, &b.f_mm(&a)?.f_reshape(&shape[..])?, acc)?,
                }
            }
        }
    }
    Ok(())
}

fn on(t: &Tensor, device: Device, kind: Kind) -> Result<Tensor> {
    Ok(t.f_to_device(device)?.f_to_kind(kind)?)
}

/// `buf ← round(f(from or buf) + delta)`, computed in `acc`.
fn add(buf: &mut Tensor, from: Option<&Tensor>, delta: &Tensor, acc: Kind) -> Result<()> {
    match from {
        Some(w) if buf.kind() == acc => {
            let _ = w.f_add_out(buf, delta)?;
        }
        None if buf.kind() == acc => {
            let _ = buf.f_add_(delta)?;
        }
        _ => {
            let w: &Tensor = match from {
                Some(w) => w,
                None => buf,
            };
            let sum = w.f_to_kind(acc)?.f_add(delta)?;
            buf.f_copy_(&sum)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_truncate_and_pop() {
        let s = Stack::default();
        let rec = |n| CommitRecord { id: CommitId(n), label: format!("c{n}"), parts: vec![] };
        for n in 1..=4 {
            s.push(rec(n));
        }
        assert!(s.truncate(Some(CommitId(2))));
        assert_eq!(s.infos().iter().map(|i| i.id.0).collect::<Vec<_>>(), [1, 2]);
        assert!(!s.truncate(Some(CommitId(9))), "unknown id");
        assert_eq!(s.pop(), Some(CommitId(2)));
        let fork = s.fork();
        assert!(s.truncate(None));
        assert_eq!(s.pop(), None);
        assert_eq!(fork.infos().len(), 1, "a fork keeps its own stack");
    }

    #[test]
    fn compute_matches_plain_tch_for_half_weights() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(3);
        let base = Tensor::randn([6, 5], (Kind::Float, Device::Cpu)).to_kind(Kind::Half);
        let a = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([6, 2], (Kind::Float, Device::Cpu));
        let rec = Arc::new(CommitRecord {
            id: CommitId(1),
            label: "l".into(),
            parts: vec![RecPart::Weight {
                group: 0,
                target: "w".into(),
                op: WeightOp::Lora {
                    a: frozen(a.shallow_clone()),
                    b: frozen(b.shallow_clone()),
                    scale: 0.25,
                },
            }],
        });
        let buf = Tensor::empty([6, 5], (Kind::Half, Device::Cpu));
        compute(&buf, Some(&base), &[OpRef { rec, part: 0 }]).unwrap();
        let want = (base.to_kind(Kind::Float) + (&b * 0.25).mm(&a)).to_kind(Kind::Half);
        assert!(buf.equal(&want));
    }
}
