//! Async use (the `tokio` feature): waiting for room without blocking the executor.
//!
//! An async acquire counts itself as a waiter (see the engine's module docs)
//! from before its first attempt until it returns or is dropped. Each attempt
//! creates its wake-up listener first, then runs on tokio's blocking pool (it
//! may evict and load, which moves bytes); if the attempt finds that it would
//! have to wait, the future awaits the listener (a release, a finished move),
//! up to the deadline, and tries again.

use std::sync::Arc;
use std::time::Duration;

use crate::manager::{Inner, ModelCore, Waiting};
use crate::{Error, Managed, OwnedGuard, Result};

/// Like [`auto_manage_owned`](crate::auto_manage_owned), for async code: waits
/// for room without blocking the executor, up to the instance's wait timeout
/// (see [`Builder::wait_timeout`](crate::Builder::wait_timeout)).
///
/// A model already resident costs one atomic operation on the calling thread;
/// otherwise loading (and the evictions it needs) runs on tokio's blocking
/// pool. Dropping the future (cancellation, `select!`, a timeout around it)
/// leaves nothing behind: a use taken by an attempt still running on the
/// blocking pool is released when that attempt ends.
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

/// Like [`auto_manage_async`], waiting at most `timeout` for room, then failing
/// with [`Error::OutOfMemory`].
pub async fn auto_manage_async_timeout<T: Send + Sync + 'static>(
    m: &Managed<T>,
    timeout: Duration,
) -> Result<OwnedGuard<T>> {
    let inner = &m.pools().inner;
    if m.has_commits() {
        // The commit path (variant turns, rebases) blocks: run it whole on the
        // blocking pool. If this future is dropped meanwhile, the guard it
        // produces is dropped with the task's output, which releases it.
        let m = m.clone();
        return blocking(move || m.owned_timeout(timeout)).await?;
    }
    if inner.hit(m.core()) {
        return Ok(m.adopt_use());
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let _counted = Waiting::new(inner);
    loop {
        // Listen before the attempt: a release that happens after the attempt
        // looked for room then wakes this listener.
        let notified = inner.notify_async.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let (i, core) = (inner.clone(), m.core().clone());
        let attempt = blocking(move || {
            let polled = i.poll_acquire(&core);
            polled.map(|wait| match wait {
                None => Attempt::Got(Use { inner: i, core, adopted: false }),
                Some(e) => Attempt::Wait(e),
            })
        });
        match attempt.await?? {
            Attempt::Got(u) => return Ok(u.adopt(m)),
            Attempt::Wait(err) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(gave_up(err, timeout));
                }
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
        }
    }
}

enum Attempt {
    Got(Use),
    Wait(Error),
}

/// One use taken on the blocking pool. Released on drop unless adopted by an
/// [`OwnedGuard`]: when the future that asked for it was dropped while the
/// attempt ran, tokio drops the attempt's output, and with it the use.
struct Use {
    inner: Arc<Inner>,
    core: Arc<ModelCore>,
    adopted: bool,
}

impl Use {
    fn adopt<T>(mut self, m: &Managed<T>) -> OwnedGuard<T> {
        debug_assert!(Arc::ptr_eq(&self.core, m.core()));
        self.adopted = true;
        m.adopt_use()
    }
}

impl Drop for Use {
    fn drop(&mut self) {
        if !self.adopted {
            self.inner.release(&self.core);
        }
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
