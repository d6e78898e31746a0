//! The applied state of a model's commits and how it changes: patched weights
//! (a buffer per weight, computed from the kept base, plus a spare), applied
//! closures, and the rebase that brings them to a stack, validated, charged
//! and undone as a whole on failure or panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use tch::{Device, Kind, Tensor};

use super::commit::{same_stack, BoxError, ClosureFn, CommitRecord, RecPart, Snapshot, WeightOp};
use crate::engine::PatchHooks;
use crate::user::Group;
use crate::{Error, Result};

/// A model's patches, locked after (and only with) the engine's per-model data
/// lock. The engine reaches it through [`PatchHooks`].
#[derive(Default)]
pub(crate) struct PatchState {
    pub(super) patches: Mutex<Patches>,
}

impl PatchHooks for PatchState {
    fn unpatch(&self, groups: &mut [Group]) {
        unpatch(groups, &mut self.patches.lock());
    }

    fn drop_spares(&self, groups: &[Group]) -> u64 {
        drop_spares(groups, &mut self.patches.lock())
    }
}

/// What is applied on a model's runtime copy.
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

impl Patches {
    /// Whether exactly `desired` is applied.
    pub(super) fn is_synced(&self, desired: &Snapshot) -> bool {
        self.synced.as_ref().is_some_and(|s| same_stack(s, desired))
    }
}

/// Bytes the patch machinery holds: a buffer per patched weight, plus its spare.
pub(super) fn held(groups: &[Group], p: &Patches) -> u64 {
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
fn drop_spares(groups: &[Group], p: &mut Patches) -> u64 {
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
fn unpatch(groups: &mut [Group], p: &mut Patches) {
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

/// The weight ops each group should carry under `desired`.
fn wanted(desired: &Snapshot) -> BTreeMap<usize, Vec<OpRef>> {
    let mut want: BTreeMap<usize, Vec<OpRef>> = BTreeMap::new();
    for rec in desired.iter() {
        for (part, rp) in rec.parts.iter().enumerate() {
            if let RecPart::Weight { group, .. } = rp {
                want.entry(*group).or_default().push(OpRef { rec: rec.clone(), part });
            }
        }
    }
    want
}

/// Bytes the patches hold once `desired` is applied: a buffer per patched
/// weight, and its spare where one is kept (new spares are optional and not
/// counted). What a rebase must have charged before it starts.
fn bytes_after(groups: &[Group], p: &Patches, want: &BTreeMap<usize, Vec<OpRef>>) -> u64 {
    let spare_kept = |g: &usize| p.groups.get(g).is_some_and(|gp| gp.spare.is_some());
    want.keys().map(|g| groups[*g].bytes * (1 + spare_kept(g) as u64)).sum()
}

/// The patch bytes a rebase to `desired` needs charged (the larger of now and after).
pub(super) fn needed_bytes(groups: &[Group], p: &Patches, desired: &Snapshot) -> u64 {
    bytes_after(groups, p, &wanted(desired)).max(held(groups, p))
}

/// Makes the applied state equal to `desired`: weights first (computed, not yet
/// visible where new), then closures; on any failure, or a panic (a closure
/// commit's, or libtorch's), everything done so far is undone and the model is
/// left as it was (a panic then resumes). `charge(bytes, grow)` sets the patch
/// bytes charged to the runtime pool and never waits: growing returns `false`
/// when the room is not free now (the caller reserves it before, see
/// [`needed_bytes`]).
pub(super) fn rebase(
    model: &str,
    groups: &mut [Group],
    p: &mut Patches,
    desired: &Snapshot,
    charge: &mut dyn FnMut(u64, bool) -> bool,
) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    let mut want = wanted(desired);
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
    // and keeps its spare (the caller reserved these bytes)...
    let bytes_before = held(groups, p);
    let mut bytes_after = bytes_after(groups, p, &want);
    if bytes_after > bytes_before && !charge(bytes_after, true) {
        return Err(Error::OutOfMemory {
            model: model.into(),
            location: crate::Location::Cpu,
            requested: bytes_after - bytes_before,
            budget: 0,
            in_use: 0,
            waited: None,
        });
    }
    // ...a new spare only takes room that is free now; without it the buffer is
    // recomputed in place.
    let mut charged = bytes_before.max(bytes_after);
    for (g, action) in &mut plan {
        if matches!(action, Action::IntoNew) {
            let b = groups[*g].bytes;
            if charge(charged + b, true) {
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
    // Inside a prefetch (a side stream), the caller's kernels may still read
    // the buffers rewritten in place below: wait for them first.
    let rewrites =
        plan.iter().any(|(_, a)| matches!(a, Action::Extend(_) | Action::InPlace | Action::IntoSpare));
    if let Some((g, _)) = plan.first().filter(|_| rewrites) {
        crate::engine::transfer::wait_for_consumer_of(groups[*g].current())?;
    }
    let mut closure_log: Vec<(ClosureFn, bool)> = Vec::new(); // (inverse to run on rollback, was apply)
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
                    crate::engine::transfer::record_for_consumer(&buf)?;
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
                    crate::engine::transfer::record_for_consumer(&buf)?;
                    compute(&buf, Some(&base), w)?;
                    fresh.push((*g, base, buf));
                }
            }
        }
        // Closures: revert what leaves (newest first), apply what comes (in order).
        run_closures(model, &p.closures, desired, &mut closure_log)
    };
    // A panic (user code in a closure, libtorch in a computation) is undone like an error.
    let (res, panic) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut weights)) {
        Ok(r) => (r, None),
        Err(payload) => (
            Err(Error::MovePanicked { model: model.into(), message: crate::error::panic_message(&*payload) }),
            Some(payload),
        ),
    };

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
        charge(now, false);
        if let Some(payload) = panic {
            std::panic::resume_unwind(payload);
        }
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
    // Exactly what is held now: this also gives back room that another
    // guard of this stack reserved for the same rebase and did not use.
    let _ = charged;
    charge(bytes_after, false);
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
    use crate::patch::commit::{frozen, CommitId};

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
