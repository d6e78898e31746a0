//! Async use (the `tokio` feature): waiting for room without blocking the executor.
//!
//! An async acquire counts itself as a waiter (see the engine's `signal`)
//! from before its first attempt until it returns or is dropped. Each attempt
//! creates its wake-up listener first, then runs on tokio's blocking pool (it
//! may evict and load, which moves bytes); if the attempt finds that it would
//! have to wait, the future awaits the listener (a release, a finished move),
//! up to the deadline, and tries again. A dropped future marks itself
//! cancelled: attempts still queued on the blocking pool then take nothing,
//! and a use an attempt took is given back as soon as it ends.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::OwnedUse;
use crate::{Error, Managed, OwnedGuard, Result};

/// Like [`auto_manage_owned`](crate::auto_manage_owned), for async code: waits
/// for room without blocking the executor, up to the instance's wait timeout
/// (see [`Builder::wait_timeout`](crate::Builder::wait_timeout)).
///
/// A model already resident costs one atomic operation on the calling thread;
/// otherwise loading (and the evictions it needs) runs on tokio's blocking
/// pool. Dropping the future (cancellation, `select!`, a timeout around it)
/// leaves nothing behind: attempts not yet started take nothing, and a use
/// taken by an attempt still running on the blocking pool is released when
/// that attempt ends.
///
/// The returned guard owns a handle on the model, so it can be moved into
/// `tokio::task::spawn_blocking` to run the model there. Requires the `tokio`
/// feature and a tokio runtime with the time driver enabled (as
/// `#[tokio::main]` and `Builder::enable_all` give).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> sire::Result<()> {
/// # let dir = tempfile::tempdir()?;
/// # let pools = sire::ResourcePoolManagement::builder().cuda(false).env(false).spill_dir(dir.path()).build()?;
/// let m = pools.manage(sire::TensorSet::new([("w", tch::Tensor::ones([4], tch::kind::FLOAT_CPU))])?)?;
/// let g = sire::auto_manage_async(&m).await?;
/// let w = g.get("w").unwrap();
/// let y = tokio::task::spawn_blocking(move || w.sum(tch::Kind::Float)).await.unwrap();
/// assert_eq!(y.double_value(&[]), 4.0);
/// # Ok(()) }
/// ```
pub async fn auto_manage_async<T: Send + Sync + 'static>(m: &Managed<T>) -> Result<OwnedGuard<T>> {
    let timeout = m.pools().inner.wait_timeout;
    auto_manage_async_timeout(m, timeout).await
}

/// A guard on `m` if it is ready on its runtime location and has no commit:
/// no bytes move, so this runs on the caller's thread; `None` otherwise.
pub(crate) fn hit_owned<T>(m: &Managed<T>) -> Option<OwnedGuard<T>> {
    let inner = &m.pools().inner;
    if m.has_commits() {
        return None;
    }
    let u = inner.hit(m.core())?;
    // The model got its first commit meanwhile: the commit path, not a hit.
    let u = OwnedUse::from_use(u, inner.clone(), m.core().clone());
    (!m.has_commits_after_acquire()).then(|| m.adopt_use(u))
}

/// Like [`auto_manage_async`], waiting at most `timeout` for room, then failing
/// with [`Error::OutOfMemory`].
pub async fn auto_manage_async_timeout<T: Send + Sync + 'static>(
    m: &Managed<T>,
    timeout: Duration,
) -> Result<OwnedGuard<T>> {
    let inner = &m.pools().inner;
    if let Some(g) = hit_owned(m) {
        return Ok(g);
    }
    if m.has_commits() {
        // The commit path (variant turns, rebases) blocks: run it whole on the
        // blocking pool. If this future is dropped meanwhile, the guard it
        // produces is dropped with the task's output, which releases it.
        let m = m.clone();
        let cancel = Cancel::new();
        let flag = cancel.flag();
        return blocking(move || {
            if flag.load(SeqCst) {
                return Err(Error::InUse { model: m.name().to_string(), guards: 0 });
                // nobody waits for it
            }
            m.owned_timeout(timeout)
        })
        .await?;
    }
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    let _counted = inner.count_waiter();
    let cancel = Cancel::new();
    loop {
        // Listen before the attempt: a release that happens after the attempt
        // looked for room then wakes this listener.
        let notified = inner.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let (i, core, flag) = (inner.clone(), m.core().clone(), cancel.flag());
        let attempt = blocking(move || -> Result<Attempt> {
            if flag.load(SeqCst) {
                return Ok(Attempt::Cancelled); // the caller is gone: take nothing
            }
            Ok(match i.poll_acquire(&core)? {
                Ok(u) => {
                    let used = OwnedUse::from_use(u, i.clone(), core.clone());
                    if flag.load(SeqCst) {
                        drop(used); // the caller left while this ran: give it back now
                        Attempt::Cancelled
                    } else {
                        Attempt::Got(used)
                    }
                }
                Err(e) => Attempt::Wait(e),
            })
        });
        match attempt.await?? {
            Attempt::Got(u) => {
                if m.has_commits_after_acquire() {
                    // The model got its first commit meanwhile: take the commit path.
                    drop(u);
                    return Box::pin(auto_manage_async_timeout(m, timeout)).await;
                }
                return Ok(m.adopt_use(u));
            }
            Attempt::Cancelled => unreachable!("this future is alive"),
            Attempt::Wait(err) => {
                let now = tokio::time::Instant::now();
                match deadline {
                    Some(d) if now >= d => return Err(gave_up(err, timeout)),
                    Some(d) => {
                        let _ = tokio::time::timeout_at(d, notified).await;
                    }
                    None => notified.await,
                }
            }
        }
    }
}

enum Attempt {
    Got(OwnedUse),
    Wait(Error),
    Cancelled,
}

/// Set when the future that owns it is dropped: attempts on the blocking pool
/// check it before and after they take a use.
struct Cancel(Arc<AtomicBool>);

impl Cancel {
    fn new() -> Cancel {
        Cancel(Arc::new(AtomicBool::new(false)))
    }

    fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// The error of a wait that reached its deadline.
fn gave_up(err: Error, timeout: Duration) -> Error {
    match err {
        Error::OutOfMemory { model, location, requested, budget, in_use, .. } => {
            Error::OutOfMemory { model, location, requested, budget, in_use, waited: Some(timeout) }
        }
        other => other,
    }
}

/// Runs `f` on tokio's blocking pool. A panic in `f` is resumed in the caller;
/// a runtime shutting down is an I/O error.
pub(crate) async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(Error::Io(std::io::Error::other("the tokio runtime is shutting down"))),
        },
    }
}
