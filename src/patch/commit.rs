//! Commits: patch stacks on managed models, exact reverts, and variants that
//! share one copy of the base weights.
//!
//! # Model
//!
//! Every handle family (a [`Managed`] and its clones) has a *desired* stack of
//! commits ([`Stack`]). A model has one *applied* state, on its runtime copy
//! (`rebase::Patches`, locked with the engine's per-model data). `commit`, `revert` and
//! `revert_to` only validate and edit the desired stack; a guard makes the
//! applied state equal to its handle's desired stack before it returns (a
//! *rebase*), and that state then holds for the guard's whole life.
//!
//! # Exclusion
//!
//! Guards on a model that has commits (or variants) go through a small
//! per-model lock (`variant::ModelCommits`): guards whose desired stacks are equal
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
//! every weight back at its base (`PatchHooks::unpatch`) and then offloads or spills the
//! base, which is therefore written at most once. The next guard replays the
//! stack. Closure commits are not weights: eviction leaves them applied.
//!
//! Patch buffers are charged to the runtime pool (the ledger's patch bytes):
//! a rebase that patches more weights makes room first (evicting idle models,
//! or waiting, never while holding the model's data lock), and fails with
//! `OutOfMemory` without changing anything if it cannot.
//!
//! This file holds the public [`Commit`] type, validated records and the
//! per-handle stacks; `variant.rs` the admission of guards; `rebase.rs` the
//! applied state and how it changes.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::sync::Arc;

use parking_lot::Mutex;
use tch::{Kind, Tensor};

use crate::user::Group;
use crate::{Error, Result};

/// The error type closure commits return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(super) type ClosureFn = Arc<dyn Fn() -> std::result::Result<(), BoxError> + Send + Sync>;

/// Identifies a commit on a model's stack (unique in the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitId(pub(super) u64);

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

static NEXT_COMMIT: AtomicU64 = AtomicU64::new(1);

impl CommitId {
    /// A new id, unique in the process.
    pub(crate) fn fresh() -> CommitId {
        CommitId(NEXT_COMMIT.fetch_add(1, Relaxed))
    }
}

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
pub(super) struct Frozen(pub(super) Tensor);

// SAFETY: `Tensor` is `Send` but not `Sync` because some of its `&self`
// methods have interior effects. A `Frozen` tensor is only ever read, through
// out-of-place operations (`to_device`, `to_kind`, `mm`, `reshape`, reading it
// as the source of a copy into another tensor), which libtorch allows from any
// number of threads at once, exactly like concurrent reads of a `Send` tensor.
unsafe impl Sync for Frozen {}

pub(super) enum WeightOp {
    /// `W += (scale * B) @ A`, A `[r, in...]`, B `[out, r...]`.
    Lora {
        a: Frozen,
        b: Frozen,
        scale: f64,
    },
    Delta(Frozen),
    Replace(Frozen),
}

pub(super) fn frozen(t: Tensor) -> Frozen {
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

    /// Splits the commit by the part that holds each weight (`owner` says
    /// which, `None` for a weight no part holds): one commit per part, in the
    /// order the parts first appear, each keeping its weights' order and the
    /// label. A closure belongs to no part: it is an error, as is an unknown
    /// weight (`model` names the model in the error).
    pub(crate) fn split_by(
        self,
        model: &str,
        owner: impl Fn(&str) -> Option<usize>,
    ) -> Result<Vec<(usize, Commit)>> {
        let mut out: Vec<(usize, Commit)> = Vec::new();
        for part in self.parts {
            let p = match &part {
                Part::Weight { target, .. } => owner(target)
                    .ok_or_else(|| Error::UnknownTensor { model: model.into(), name: target.clone() })?,
                Part::Closure { .. } => {
                    return Err(Error::InvalidCommit {
                        model: model.into(),
                        reason: format!(
                            "`{}` holds a closure, which belongs to no part: commit it to one part \
                             (`parts()[i].commit`)",
                            self.label
                        ),
                    })
                }
            };
            match out.iter_mut().find(|(q, _)| *q == p) {
                Some((_, c)) => c.parts.push(part),
                None => out.push((p, Commit { label: self.label.clone(), parts: vec![part] })),
            }
        }
        Ok(out)
    }

    /// The commit's label.
    pub(crate) fn label(&self) -> &str {
        &self.label
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
    pub(super) id: CommitId,
    pub(super) label: String,
    pub(super) parts: Vec<RecPart>,
}

pub(super) enum RecPart {
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

    pub(super) fn describe(&self) -> String {
        format!("{} ({})", self.label, self.id)
    }
}

/// A stack of commits, oldest first, as one shared snapshot.
pub(crate) type Snapshot = Arc<Vec<Arc<CommitRecord>>>;

pub(super) fn same_stack(a: &[Arc<CommitRecord>], b: &[Arc<CommitRecord>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.id == y.id)
}

/// The names, shapes and dtypes of a model's weights (known without loading).
pub(crate) struct Index {
    by_name: HashMap<String, usize>,
    names: Vec<String>,
    shapes: Vec<(Vec<i64>, Kind)>,
}

impl Index {
    pub(super) fn build(groups: &[Group]) -> Index {
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
    Ok(CommitRecord { id: CommitId::fresh(), label: c.label, parts })
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
}
