//! The variant lock: who may use a model that has commits, and with which
//! stack applied. Guards wanting the applied stack share the model; another
//! stack waits, in arrival order, until the model is free, then rebases it.
//! Admissions, uses and the "engaged" count are values that give themselves
//! back on drop ([`CommitHold`]), so an error or a panic (a closure commit's)
//! anywhere on this path releases everything.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, OnceLock};
use std::thread::ThreadId;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::commit::{same_stack, Index, Snapshot, Stack};
use super::rebase::{self, PatchState};
use crate::engine::{Engine, ModelCore, Use, Wait};
use crate::{Error, Result};

/// Per-model state shared by all handles and variants.
#[derive(Default)]
pub(crate) struct ModelCommits {
    /// Set once the model has a commit or a variant: guards then take the slow path.
    active: AtomicBool,
    /// Guards admitted here that hold a use of the model.
    engaged: AtomicU64,
    lock: Mutex<Admissions>,
    cond: Condvar,
    index: OnceLock<Index>,
    /// The applied patches (registered with the engine on activation).
    state: Arc<PatchState>,
}

#[derive(Default)]
struct Admissions {
    /// The admitted guards (all want `current`), one entry each: the thread
    /// of a borrowed guard, `None` for an owned one (an owned guard, a batch, a
    /// prefetch or an async acquire may live on any thread, so it never makes
    /// a later guard "nested").
    holders: Vec<Option<ThreadId>>,
    /// Guards waiting, in arrival order: ticket and wanted stack.
    queue: VecDeque<(u64, Snapshot)>,
    next_ticket: u64,
    current: Option<Snapshot>,
}

impl ModelCommits {
    /// Whether guards must take the commit path (cheap check before a plain guard).
    #[inline]
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Relaxed)
    }

    /// The same, ordered after the caller's use-count increment (see `commit.rs`).
    #[inline]
    pub(crate) fn is_active_after_acquire(&self) -> bool {
        self.active.load(SeqCst)
    }

    /// Switches the model to the commit path and hands its patches to the engine.
    pub(crate) fn activate(&self, core: &ModelCore) {
        let _ = core.patches.get_or_init(|| self.state.clone());
        self.active.store(true, SeqCst);
    }

    pub(crate) fn index(&self, core: &ModelCore) -> &Index {
        self.index.get_or_init(|| core.with_groups(|groups| Index::build(groups)))
    }

    /// Admits a guard wanting `desired`. It joins the holders if they use the
    /// same stack and nobody wanting another stack queued before it (so a
    /// stream of same-stack guards cannot starve a queued variant), or at once
    /// when this thread already holds the model with that stack (a nested
    /// guard); it takes a free model when nobody wanting another stack is ahead
    /// of it. Otherwise it queues until its deadline.
    fn admit(
        &self,
        model: &str,
        desired: &Snapshot,
        wait: Wait,
        me: Option<ThreadId>,
        cancel: Option<&AtomicBool>,
    ) -> Result<Admission<'_>> {
        let wait = wait.start();
        let mut s = self.lock.lock();
        let mut ticket = None;
        let res = loop {
            let pos = ticket.map_or(s.queue.len(), |t| {
                s.queue.iter().position(|(x, _)| *x == t).expect("queued until admitted or gone")
            });
            let ahead_differs = s.queue.iter().take(pos).any(|(_, st)| !same_stack(st, desired));
            let same = s.current.as_ref().is_some_and(|c| same_stack(c, desired));
            let ok = if s.holders.is_empty() {
                !ahead_differs || matches!(wait, Wait::No)
            } else {
                same && (!ahead_differs || (me.is_some() && s.holders.contains(&me)))
            };
            if ok {
                break Ok(());
            }
            let cancelled = cancel.is_some_and(|c| c.load(SeqCst));
            let waited = match wait.deadline() {
                Some(d) if !d.passed() && !cancelled => {
                    if ticket.is_none() {
                        let t = s.next_ticket;
                        s.next_ticket += 1;
                        s.queue.push_back((t, desired.clone()));
                        ticket = Some(t);
                    }
                    // A cancellable waiter looks at its flag at least every 10 ms.
                    let slice = cancel.map(|_| std::time::Instant::now() + Duration::from_millis(10));
                    match (d.instant(), slice) {
                        (Some(at), Some(sl)) => {
                            self.cond.wait_until(&mut s, at.min(sl));
                        }
                        (Some(at), None) | (None, Some(at)) => {
                            self.cond.wait_until(&mut s, at);
                        }
                        (None, None) => self.cond.wait(&mut s),
                    }
                    continue;
                }
                Some(d) => Some(d.total()),
                None => None,
            };
            break Err(waited);
        };
        if let Some(t) = ticket {
            s.queue.retain(|(x, _)| *x != t);
        }
        match res {
            Ok(()) => {
                if s.holders.is_empty() {
                    s.current = Some(desired.clone());
                }
                s.holders.push(me);
                if !s.queue.is_empty() {
                    self.cond.notify_all(); // waiters wanting the same stack may join
                }
                Ok(Admission { mc: self, holder: me })
            }
            Err(waited) => {
                // Others may have queued behind this one.
                if !s.queue.is_empty() {
                    self.cond.notify_all();
                }
                let guards = s.holders.len() as u64;
                tracing::debug!(model, ?waited, guards, "variant admission gave up");
                Err(Error::InUse { model: model.into(), guards })
            }
        }
    }

    fn leave(&self, holder: Option<ThreadId>) {
        let mut s = self.lock.lock();
        if let Some(i) = s.holders.iter().position(|t| *t == holder) {
            s.holders.swap_remove(i);
        }
        if s.holders.is_empty() && !s.queue.is_empty() {
            self.cond.notify_all();
        }
    }
}

/// An admitted guard's place among the holders; leaves on drop.
struct Admission<'a> {
    mc: &'a ModelCommits,
    holder: Option<ThreadId>,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.mc.leave(self.holder);
    }
}

/// Counts an admitted guard that holds a use; uncounts on drop.
struct Engaged<'a>(&'a ModelCommits);

impl Drop for Engaged<'_> {
    fn drop(&mut self) {
        self.0.engaged.fetch_sub(1, SeqCst);
    }
}

/// A guard's hold on a model with commits: admitted, one use, engaged. The
/// fields drop in order: engaged, then the use, then the admission.
#[must_use = "dropping the hold releases the model"]
pub(crate) struct CommitHold<'a> {
    _engaged: Engaged<'a>,
    _use: Use<'a>,
    admission: Admission<'a>,
}

impl CommitHold<'_> {
    /// Hands the hold over to an owner that releases it with [`release`],
    /// giving how it was counted among the holders.
    pub(crate) fn forget(self) -> Option<ThreadId> {
        let holder = self.admission.holder;
        std::mem::forget(self);
        holder
    }
}

/// Gives back a hold handed over by [`CommitHold::forget`].
pub(crate) fn release(engine: &Engine, core: &ModelCore, mc: &ModelCommits, holder: Option<ThreadId>) {
    mc.engaged.fetch_sub(1, SeqCst);
    engine.release(core);
    mc.leave(holder);
}

/// Who takes a hold: a borrowed guard on this thread (a later guard of the
/// same stack on this thread nests at once), or an owned one (no nesting);
/// and, for an async caller, the flag its dropped future sets.
#[derive(Clone, Copy)]
pub(crate) struct Taker<'c> {
    /// A borrowed guard, counted by its thread.
    pub borrowed: bool,
    /// Set when the caller gave up (its future was dropped): stop waiting and take nothing.
    pub cancel: Option<&'c AtomicBool>,
}

/// Takes a use of the model with `stack` applied on it (the guard slow path).
pub(crate) fn acquire<'a>(
    engine: &'a Engine,
    core: &'a Arc<ModelCore>,
    mc: &'a ModelCommits,
    stack: &Stack,
    wait: Wait,
    taker: Taker<'_>,
) -> Result<CommitHold<'a>> {
    let wait = wait.start();
    let desired = stack.snapshot();
    let me = taker.borrowed.then(|| std::thread::current().id());
    let admission = mc.admit(&core.name, &desired, wait, me, taker.cancel)?;
    let cancelled = || taker.cancel.is_some_and(|c| c.load(SeqCst));
    let gone = || Error::InUse { model: core.name.clone(), guards: 0 };
    if cancelled() {
        return Err(gone());
    }
    let used = engine.acquire(core, wait)?;
    mc.engaged.fetch_add(1, SeqCst);
    let hold = CommitHold { _engaged: Engaged(mc), _use: used, admission };
    if cancelled() {
        return Err(gone()); // nobody waits for it: no rebase
    }
    sync(engine, core, mc, &desired, wait)?;
    Ok(hold)
}

/// Brings the applied state to `desired`. Runs with a use of the model held and
/// the variant lock admitted for `desired`. Waits (for room, for the model's
/// data) only as long as `wait` allows, and never waits for room while holding
/// the model's data lock: the patch bytes are reserved first, then the data is
/// locked and the rebase runs.
fn sync(engine: &Engine, core: &ModelCore, mc: &ModelCommits, desired: &Snapshot, wait: Wait) -> Result<()> {
    let wait = wait.start();
    let mut reserved = false;
    let res = sync_steps(engine, core, mc, desired, wait, &mut reserved);
    if res.is_err() && reserved {
        // Give back room reserved for a rebase that did not happen (when the
        // weights are free to look at; otherwise the rebase under way trims it).
        if let Some(groups) = core.groups_within(Wait::No) {
            let p = mc.state.patches.lock();
            engine.shrink_patch_bytes(core, rebase::held(&groups, &p));
        }
    }
    res
}

fn sync_steps(
    engine: &Engine,
    core: &ModelCore,
    mc: &ModelCommits,
    desired: &Snapshot,
    wait: Wait,
    reserved: &mut bool,
) -> Result<()> {
    let mut pause = Duration::from_micros(50);
    let busy = || Error::InUse { model: core.name.clone(), guards: core.uses().saturating_sub(1) };
    loop {
        enum Step {
            Room(u64),
            PlainGuards,
        }
        let step = {
            let Some(mut groups) = core.groups_within(wait) else { return Err(busy()) };
            let mut p = mc.state.patches.lock();
            if p.is_synced(desired) {
                return Ok(());
            }
            if core.uses() > mc.engaged.load(SeqCst) {
                // Guards taken before the model's first commit did not come through the
                // variant lock: wait for them to drop before changing the weights.
                Step::PlainGuards
            } else {
                let need = rebase::needed_bytes(&groups, &p, desired);
                if need > engine.patch_bytes(core) {
                    Step::Room(need)
                } else {
                    return rebase::rebase(&core.name, &mut groups, &mut p, desired, &mut |bytes, grow| {
                        if grow {
                            engine.try_grow_patch_bytes(core, bytes)
                        } else {
                            engine.shrink_patch_bytes(core, bytes);
                            true
                        }
                    });
                }
            }
        };
        match step {
            Step::Room(need) => {
                engine.set_patch_bytes(core, need, wait)?;
                *reserved = true;
            }
            Step::PlainGuards => match wait.deadline() {
                Some(d) if !d.passed() => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
                _ => return Err(busy()),
            },
        }
    }
}
