//! A pass over a parted model: [`Stream`] takes each part just in time,
//! prefetches the one expected next and orders the recency of the model's
//! idle parts so that the right ones stay resident between passes.

use crate::{
    auto_manage_owned, prefetch, Error, Location, Managed, OwnedGuard, Prefetch, ResourceUser, Result,
    TensorSet,
};

use super::worker::{Answer, Worker};
use super::Parted;

impl Parted {
    /// Starts a pass over the model: see [`Stream`].
    pub fn stream(&self) -> Stream<'_> {
        let expected = self.order();
        let window = 64 * (self.parts.len() as u64 + expected.len() as u64 + 1);
        let base = self.pools.inner.reserve_stamps(2 * window);
        // The parts not in use are needed by this pass in the expected order:
        // the first needed gets the newest stamp (see `Stream::release`).
        let mut position: Vec<Option<usize>> = vec![None; self.parts.len()];
        for (p, &i) in expected.iter().enumerate() {
            position[i].get_or_insert(p);
        }
        let position: Vec<u64> = position
            .iter()
            .enumerate()
            .map(|(i, p)| (p.unwrap_or(expected.len() + i) as u64).min(window - 1))
            .collect();
        for (m, &p) in self.parts.iter().zip(&position) {
            m.set_last_used(base + 2 * window - 1 - p);
        }
        let kept = self.kept_prefix(&position);
        Stream {
            parted: self,
            current: None,
            span: None,
            next: None,
            worker: None,
            expected,
            pos: None,
            seen: Vec::new(),
            base,
            window,
            position,
            kept,
            released: 0,
            loaded: Vec::new(),
        }
    }

    /// The parts a pass keeps resident, for a model at least 1.5 times the
    /// host budget: the first ones in the expected order, as many as fit
    /// beside two of the largest parts (the streaming slots). The others then
    /// stream as one run of the order (of the file, for parts in file order),
    /// and a pass starts with resident parts to compute while the first
    /// streamed part is read. Nothing is kept this way below 1.5 times (the
    /// stream's recency order alone then reloads about the shortfall), where
    /// the others are fewer than eight of the largest parts (the part more a
    /// pass reads would cost more than an eighth), or for parts that run on
    /// a GPU (not measured there yet).
    fn kept_prefix(&self, position: &[u64]) -> Vec<bool> {
        let none = vec![false; self.parts.len()];
        if self.parts.iter().any(|m| m.runtime() != Location::Cpu) {
            return none;
        }
        let Some(budget) = self.pools.pools().iter().find(|(l, _)| *l == Location::Cpu).map(|(_, b)| *b)
        else {
            return none;
        };
        let total: u64 = self.parts.iter().map(charge).sum();
        if total.saturating_mul(2) < budget.saturating_mul(3) {
            return none;
        }
        let largest = self.parts.iter().map(charge).max().unwrap_or(0);
        let mut order: Vec<usize> = (0..self.parts.len()).collect();
        order.sort_by_key(|&i| position[i]);
        let mut kept = none;
        let (mut used, mut held) = (2 * largest, 0u64);
        for i in order {
            used = used.saturating_add(charge(&self.parts[i]));
            if used > budget {
                break;
            }
            held += charge(&self.parts[i]);
            kept[i] = true;
        }
        // The second slot reads about one part a pass more than the recency
        // order does: worth it where that is at most an eighth of the pass.
        if largest.saturating_mul(8) > total - held {
            kept.fill(false);
        }
        kept
    }
}

/// What a part takes of its pool's budget while resident.
fn charge(m: &Managed<TensorSet>) -> u64 {
    m.size_bytes() + m.core().reserve
}

/// Whether a part is on its runtime location.
pub(super) fn is_resident(m: &Managed<TensorSet>) -> bool {
    m.location() == m.runtime()
}

/// One pass over a [`Parted`] model: [`Stream::part`] takes a part just in
/// time, releases the part taken before and starts prefetching the part
/// expected next, so that its transfer overlaps the current part's compute
/// (a background thread reading from the disk tier into host memory, or
/// copying to the device). Dropping the stream releases everything, also
/// when a panic unwinds through it.
///
/// **Order.** The first pass prefetches in declaration order; each later
/// pass follows the order the last pass took the parts in. A pass that takes
/// them in another order is served correctly (a prefetch that guessed wrong
/// is simply released) and its order is followed from then on.
///
/// **Budget.** At most one prefetch is under way: of the first part expected
/// that is not resident. The part right after the current one is prefetched
/// when the runtime pool's budget holds the two together, so a model larger
/// than the budget streams through a budget of two parts. A part further
/// ahead (the parts between are resident) is prefetched when the room it
/// needs is free or held by parts this pass has released, so the reads of a
/// partly resident model start while its resident parts compute.
///
/// **Threads.** A host part is prefetched on one thread per pass, woken for
/// each part (not a thread started per part, which waits for a core while
/// the compute fills them all); the model keeps it for its next pass.
///
/// **What stays resident.** Within a model streamed in a loop, plain
/// least-recently-used eviction would evict each part just before it is
/// needed again. A stream therefore orders its model's idle parts itself:
/// the part it released last is evicted first (it is needed last by the next
/// pass), and the parts this pass has not reached yet are kept, the one it
/// needs soonest longest. A model slightly larger than the budget then
/// reloads only about the shortfall each pass. A model on the CPU at least
/// 1.5 times the host budget, streaming at least eight parts a pass, keeps a
/// prefix instead: the first parts in the expected order, as many as fit
/// beside two streaming slots, are never evicted by the pass, and the others
/// stream through the slots as one run.
/// That reads one part more per pass than the shortfall, but in one run of
/// the file rather than several, and each pass starts on resident parts
/// while the first streamed part is read: cold passes 9–13% faster on the
/// machine measured (BENCHMARKS.md). Relative to other models, the parts
/// count as used when the pass started.
///
/// ```
/// # fn main() -> sire::Result<()> {
/// use sire::{ManageOptions, Split, TensorSet};
/// use tch::{kind::FLOAT_CPU, Tensor};
/// # let dir = tempfile::tempdir()?;
/// # let pools = sire::ResourcePoolManagement::builder().cuda(false).env(false)
/// #     .cpu_budget(1 << 20).spill_dir(dir.path()).build()?;
/// let set = TensorSet::new((0..4).map(|i| (format!("b{i}.w"), Tensor::full([1024], i as f64, FLOAT_CPU))))?;
/// let model = pools.manage_parts(set, Split::TopLevel, ManageOptions::new())?;
/// let mut sums = Vec::new();
/// let mut pass = model.stream();
/// for i in [3, 1, 2, 0] {
///     sums.push(pass.part(i)?.get(&format!("b{i}.w")).unwrap().sum(tch::Kind::Float).double_value(&[]));
/// }
/// drop(pass);
/// assert_eq!(sums, [3072.0, 1024.0, 2048.0, 0.0]);
/// assert_eq!(model.order(), [3, 1, 2, 0]); // the next pass prefetches in this order
/// # Ok(()) }
/// ```
#[must_use = "a stream holds its current part until dropped"]
pub struct Stream<'a> {
    parted: &'a Parted,
    current: Option<(usize, OwnedGuard<TensorSet>)>,
    /// The `sire.part` span of the current part, entered on the thread that
    /// took it until the part is released (a trace shows the part's use),
    /// with that thread.
    span: Option<(tracing::Span, std::thread::ThreadId)>,
    next: Option<(usize, Pending)>,
    /// The thread that prefetches host parts (taken from the model's idle
    /// ones, or started, at the first; given back when the pass ends).
    worker: Option<Worker>,
    /// The order expected (from earlier passes).
    expected: Vec<usize>,
    /// Where this pass is in `expected`.
    pos: Option<usize>,
    /// The parts taken so far, in order.
    seen: Vec<usize>,
    /// The first stamp of this pass's window of `2 * window` stamps.
    base: u64,
    window: u64,
    /// Each part's place in the expected order (its stamp's offset).
    position: Vec<u64>,
    /// The parts this pass keeps resident (see [`Parted::kept_prefix`]).
    kept: Vec<bool>,
    /// Parts released so far.
    released: u64,
    /// Parts that were not resident when this pass asked for (or prefetched) them.
    loaded: Vec<usize>,
}

impl std::fmt::Debug for Stream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("model", &self.parted.name)
            .field("current", &self.current.as_ref().map(|(i, _)| *i))
            .field("prefetching", &self.next.as_ref().map(|(i, _)| *i))
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl Stream<'_> {
    /// Takes part `i` and returns a guard on it (its tensors are on
    /// `device()` while the stream holds it): waits for its prefetch if one is
    /// under way, else loads it, like [`auto_manage`](crate::auto_manage).
    /// The part taken before is released first; the part expected next is
    /// then prefetched. Taking the current part again returns it. Tensors
    /// taken from the guard follow the part's weights: use them before the
    /// next call, after which the part may be evicted.
    ///
    /// Errors as [`auto_manage`](crate::auto_manage) for the part (a part
    /// larger than the whole budget is [`Error::TooLarge`]); an index out of
    /// range is [`Error::InvalidOptions`].
    pub fn part(&mut self, i: usize) -> Result<&OwnedGuard<TensorSet>> {
        let parts = &self.parted.parts;
        if i >= parts.len() {
            return Err(Error::InvalidOptions {
                model: self.parted.name.clone(),
                reason: format!("no part {i}: the model has {}", parts.len()),
            });
        }
        if self.current.as_ref().is_none_or(|(c, _)| *c != i) {
            self.release();
            let guard = match self.next.take() {
                Some((j, pending)) if j == i => match pending.wait_traced() {
                    Ok(g) => g,
                    // The prefetch failed: try again here, for the error.
                    Err(_) => auto_manage_owned(&parts[i])?,
                },
                // A prefetch further ahead (part `i` was resident when it
                // started): it goes on if part `i` can be had without waiting
                // for room, which the prefetched part may be holding.
                Some((j, pending)) if !self.seen.contains(&j) => {
                    let resident = is_resident(&parts[i]);
                    match parts[i].owned_timeout(std::time::Duration::ZERO) {
                        Ok(g) => {
                            self.next = Some((j, pending));
                            if !resident {
                                self.loaded.push(i);
                            }
                            g
                        }
                        Err(_) => {
                            drop(pending.wait());
                            if !is_resident(&parts[i]) {
                                self.loaded.push(i);
                            }
                            auto_manage_owned(&parts[i])?
                        }
                    }
                }
                other => {
                    // A guess that was wrong: finish it (the part stays resident, idle).
                    if let Some((_, pending)) = other {
                        drop(pending.wait());
                    }
                    if !is_resident(&parts[i]) {
                        self.loaded.push(i);
                    }
                    auto_manage_owned(&parts[i])?
                }
            };
            self.advance(i);
            self.current = Some((i, guard));
            let span = tracing::debug_span!("sire.part", model = %parts[i].name(), part = i);
            span.with_subscriber(|(id, dispatch)| dispatch.enter(id));
            self.span = Some((span, std::thread::current().id()));
            self.prefetch_after(i);
        }
        Ok(&self.current.as_ref().expect("taken above").1)
    }

    /// The parts this pass had to load (they were not resident when it asked
    /// for them or prefetched them), in order.
    pub fn loaded(&self) -> &[usize] {
        &self.loaded
    }

    /// The parts taken so far, in order.
    pub fn seen(&self) -> &[usize] {
        &self.seen
    }

    /// Notes that part `i` was taken: follows it in the expected order.
    fn advance(&mut self, i: usize) {
        let exp = &self.expected;
        self.pos = match self.pos {
            Some(p) if exp.get(p + 1) == Some(&i) => Some(p + 1),
            p => {
                let after = p.map_or(0, |p| p + 1);
                exp[after.min(exp.len())..]
                    .iter()
                    .position(|&x| x == i)
                    .map(|k| after + k)
                    .or_else(|| exp.iter().position(|&x| x == i))
            }
        };
        self.seen.push(i);
    }

    /// Starts prefetching the first part expected after `i` that is not
    /// resident, if none is under way. The part right after `i` is
    /// prefetched if the budget holds it beside part `i`; a part further
    /// ahead (the parts between are resident) only if the room it needs is
    /// free or held by parts this pass has released (the stream's recency
    /// order evicts those first), never by parts the pass still needs before
    /// it. So the disk reads of a model partly resident start during the
    /// compute of its resident parts, not after it.
    fn prefetch_after(&mut self, i: usize) {
        if self.next.is_some() {
            return;
        }
        let parts = &self.parted.parts;
        let ahead: Vec<usize> = match self.pos {
            Some(p) => self.expected[p + 1..].to_vec(),
            None => (i + 1..parts.len()).collect(),
        };
        let Some((k, next)) =
            ahead.iter().copied().enumerate().find(|&(_, j)| j != i && !is_resident(&parts[j]))
        else {
            return;
        };
        let (cur, nxt) = (&parts[i], &parts[next]);
        let loc = nxt.runtime();
        if k == 0 {
            let Some(budget) = self.parted.pools.pools().iter().find(|(l, _)| *l == loc).map(|(_, b)| *b)
            else {
                return;
            };
            let beside = if cur.runtime() == loc { charge(cur) } else { 0 };
            if beside.saturating_add(charge(nxt)) > budget {
                return;
            }
        } else {
            let Some((budget, used)) = self.parted.pools.stats().pool(loc).map(|p| (p.budget, p.used)) else {
                return;
            };
            // Parts this pass has released (not those it keeps), and the
            // parts it does not keep that it needs after `next`.
            let mut released: Vec<usize> =
                self.seen.iter().copied().filter(|&j| j != i && !self.kept[j]).collect();
            let pinned = self.kept.iter().any(|&k| k);
            released.extend((0..parts.len()).filter(|&j| {
                pinned
                    && !self.kept[j]
                    && j != i
                    && !self.seen.contains(&j)
                    && self.position[j] > self.position[next]
            }));
            released.sort_unstable();
            released.dedup();
            let reclaimable: u64 = released
                .iter()
                .map(|&j| &parts[j])
                .filter(|m| is_resident(m) && m.use_count() == 0 && m.runtime() == loc)
                .map(charge)
                .sum();
            let free = budget.saturating_sub(used);
            if free.saturating_add(reclaimable) < charge(nxt) {
                return;
            }
        }
        if let Some(pending) = Pending::start(nxt, self.parted, &mut self.worker) {
            self.loaded.push(next);
            self.next = Some((next, pending));
        }
    }

    /// Releases the current part, after stamping its recency.
    ///
    /// The stamps come from a window reserved when the pass started (no use
    /// of any model takes them). Its upper half went, at the start, to the
    /// parts in the order this pass is expected to need them (the first
    /// needed the newest); its lower half goes to the parts as they are
    /// released, each one older than the one before. So among the model's idle
    /// parts the engine (which evicts the oldest first) evicts the part this
    /// pass released last, and keeps the parts it has not reached yet: most
    /// recently used first, the right victim for a loop (the part used last
    /// is needed last by the next pass), where least recently used first
    /// would evict each part just before it is needed again.
    fn release(&mut self) {
        if let Some((span, thread)) = self.span.take() {
            // Exited where it was entered (a subscriber keeps a stack of
            // entered spans per thread). A stream moved to another thread
            // between two parts leaves that part's span open in the trace.
            if thread == std::thread::current().id() {
                span.with_subscriber(|(id, dispatch)| dispatch.exit(id));
            }
        }
        if let Some((c, guard)) = self.current.take() {
            let k = self.released.min(self.window - 1);
            let stamp = match self.kept[c] {
                // Needed first by the next pass: newer than any part ahead.
                true => self.base + 2 * self.window - 1 - self.position[c],
                false => self.base + self.window - 1 - k,
            };
            self.parted.parts[c].set_last_used(stamp);
            self.released += 1;
            drop(guard);
        }
    }
}

/// A prefetch under way.
enum Pending {
    /// A part that runs on a CUDA device: [`prefetch`], whose copies run on a
    /// side stream.
    Device(Prefetch<TensorSet>),
    /// A part that runs on the CPU: loaded on the stream's prefetch thread
    /// ([`Worker`]), which then reads its pages in (weights mapped from their file are read from disk
    /// there, not by the compute that first touches them).
    Host(Answer<Result<OwnedGuard<TensorSet>>>, String),
}

impl Pending {
    /// Starts prefetching `m`, a part of `parted`, on `worker` for a host
    /// part (taken from `parted`'s idle threads, or started, if `None`);
    /// `None` if no thread could be started.
    fn start(m: &Managed<TensorSet>, parted: &Parted, worker: &mut Option<Worker>) -> Option<Pending> {
        if m.runtime() != Location::Cpu {
            return Some(Pending::Device(prefetch(m)));
        }
        if worker.is_none() {
            let idle = parted.workers.lock().pop();
            *worker = idle.or_else(|| Worker::start(format!("sire-prefetch-{}", parted.name)));
        }
        let (m, name) = (m.clone(), m.name().to_string());
        let answer = worker.as_ref()?.run(move || {
            let _span = tracing::debug_span!("sire.prefetch", model = %m.name()).entered();
            let g = auto_manage_owned(&m)?;
            for (_, t) in g.tensors() {
                if t.defined() && t.numel() > 0 {
                    let bytes = t.numel() * t.kind().elt_size_in_bytes();
                    let _ = crate::tier::ffi::read_ahead(t.data_ptr() as *const u8, bytes);
                }
            }
            Ok(g)
        });
        Some(Pending::Host(answer, name))
    }

    /// [`Pending::wait`] for the part the stream takes next, seen in a trace
    /// as a `sire.wait` span (the time the compute waited for the transfer).
    fn wait_traced(self) -> Result<OwnedGuard<TensorSet>> {
        let span = match &self {
            Pending::Device(_) => tracing::debug_span!("sire.wait"),
            Pending::Host(_, model) => tracing::debug_span!("sire.wait", model = %model),
        };
        span.in_scope(|| self.wait())
    }

    /// Waits for the prefetch and returns its guard.
    fn wait(self) -> Result<OwnedGuard<TensorSet>> {
        match self {
            Pending::Device(p) => p.wait(),
            Pending::Host(answer, model) => match answer.recv() {
                Ok(Ok(got)) => got,
                Ok(Err(message)) => Err(Error::MovePanicked { model, message }),
                Err(_) => Err(Error::MovePanicked { model, message: "the prefetch thread is gone".into() }),
            },
        }
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        self.release();
        if let Some((_, pending)) = self.next.take() {
            // Waited for, so that nothing is held once the stream is gone.
            drop(pending.wait());
        }
        if let Some(worker) = self.worker.take() {
            self.parted.workers.lock().push(worker);
        }
        // The order to follow: this pass's, unless it stopped within the
        // expected order (an early end) or a panic cut it short.
        if !self.seen.is_empty() && !self.expected.starts_with(&self.seen) && !std::thread::panicking() {
            *self.parted.order.lock() = std::mem::take(&mut self.seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManageOptions, ResourcePoolManagement, Split};

    /// A pass prefetches its host parts on one thread, which the model keeps
    /// for the next pass; two passes at once use one each.
    #[test]
    fn prefetches_run_on_one_thread_that_the_model_keeps() {
        let dir = tempfile::tempdir().unwrap();
        // Six parts of 64 KiB under a budget of four and a half.
        let pools = ResourcePoolManagement::builder()
            .cuda(false)
            .env(false)
            .cpu_budget(288 << 10)
            .spill_dir(dir.path())
            .build()
            .unwrap();
        let set = TensorSet::new(
            (0..6).map(|i| (format!("l{i}.w"), tch::Tensor::ones([128, 128], tch::kind::FLOAT_CPU))),
        )
        .unwrap();
        let m = pools.manage_parts(set, Split::TopLevel, ManageOptions::new()).unwrap();
        let pass = |m: &Parted| {
            let mut s = m.stream();
            let mut threads = Vec::new();
            for i in 0..6 {
                s.part(i).unwrap();
                threads.extend(s.worker.as_ref().map(Worker::id));
            }
            assert!(s.loaded().len() >= 2, "parts were prefetched: {:?}", s.loaded());
            threads
        };
        let first = pass(&m);
        assert!(!first.is_empty() && first.iter().all(|&t| t == first[0]), "one thread a pass: {first:?}");
        assert_eq!(m.workers.lock().len(), 1, "kept by the model");
        let second = pass(&m);
        assert!(second.iter().all(|&t| t == first[0]), "the next pass reuses it: {second:?}");
        assert_eq!(m.workers.lock().len(), 1);
        // Two passes at once, each taking a part on disk and prefetching the
        // next: the second starts a thread of its own.
        for p in m.parts() {
            p.offload().unwrap();
        }
        let (mut a, mut b) = (m.stream(), m.stream());
        a.part(0).unwrap();
        b.part(3).unwrap();
        let ids = [a.worker.as_ref().map(Worker::id), b.worker.as_ref().map(Worker::id)];
        assert!(ids.iter().all(Option::is_some) && ids[0] != ids[1], "{ids:?}");
        drop((a, b));
        assert_eq!(m.workers.lock().len(), 2);
        assert!(m.parts().iter().all(|p| p.use_count() == 0));
    }
}
