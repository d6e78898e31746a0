//! Waiting for a change: the count of callers in the slow path, the condition
//! variable that blocked callers sleep on, and the notification async callers
//! await, behind one wait-for-change-until-deadline primitive.
//!
//! The rule that makes wake-ups reliable: a caller counts itself
//! ([`Signal::count`]) *before* it looks for room, and reads use counts with a
//! read-modify-write; a release that drops a model's last use reads the count
//! after its decrement and, if anyone is counted, notifies. See `loom/`.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, MutexGuard};

/// A point in time a call may wait until (`None`: forever), and the whole
/// wait it was given (for error messages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    at: Option<Instant>,
    total: Duration,
}

impl Deadline {
    /// `timeout` from now; a timeout too large to represent waits forever.
    pub(crate) fn after(timeout: Duration) -> Deadline {
        Deadline { at: Instant::now().checked_add(timeout), total: timeout }
    }

    pub(crate) fn instant(&self) -> Option<Instant> {
        self.at
    }

    pub(crate) fn total(&self) -> Duration {
        self.total
    }

    pub(crate) fn passed(&self) -> bool {
        self.at.is_some_and(|d| Instant::now() >= d)
    }
}

/// How long a call may wait for room.
#[derive(Clone, Copy)]
pub(crate) enum Wait<'a> {
    /// Never wait.
    No,
    /// Wait at most this long from the start of the slow path (no clock is
    /// read on the hit path); [`Wait::start`] fixes the deadline.
    For(Duration),
    /// Wait for changes until the deadline.
    Until(Deadline),
    /// Never wait; set the flag when the call fails because it would have to
    /// (the async layer then awaits a notification instead).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Poll(&'a Cell<bool>),
}

impl Wait<'_> {
    pub(crate) fn timeout(timeout: Duration) -> Wait<'static> {
        Wait::For(timeout)
    }

    /// Fixes the deadline of a `For` wait from now; other waits are unchanged.
    /// Called where a slow path starts.
    pub(crate) fn start(self) -> Self {
        match self {
            Wait::For(d) => Wait::Until(Deadline::after(d)),
            w => w,
        }
    }

    /// The deadline, if this wait has one (a `For` is fixed from now).
    pub(crate) fn deadline(self) -> Option<Deadline> {
        match self.start() {
            Wait::Until(d) => Some(d),
            _ => None,
        }
    }
}

/// Why a wait ended without the change it waited for.
pub(crate) enum Gave {
    /// The call may not wait (`Wait::No`), or polls (the flag is set).
    Up,
    /// The deadline passed; the whole wait it was given.
    TimedOut(Duration),
}

pub(crate) struct Signal {
    cond: Condvar,
    waiters: AtomicUsize,
    #[cfg(feature = "tokio")]
    notify: tokio::sync::Notify,
}

impl Signal {
    pub(crate) fn new() -> Signal {
        Signal {
            cond: Condvar::new(),
            waiters: AtomicUsize::new(0),
            #[cfg(feature = "tokio")]
            notify: tokio::sync::Notify::new(),
        }
    }

    /// Counts the caller as a waiter until the returned value is dropped.
    pub(crate) fn count(&self) -> Counted<'_> {
        self.waiters.fetch_add(1, SeqCst);
        Counted(self)
    }

    /// Callers counted now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiters.load(SeqCst)
    }

    /// Wakes every waiter, blocked or async.
    pub(crate) fn notify(&self) {
        self.cond.notify_all();
        #[cfg(feature = "tokio")]
        self.notify.notify_waiters();
    }

    /// A future resolved by the next [`Signal::notify`].
    #[cfg(feature = "tokio")]
    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Waits under `guard` for a notification, or gives up as `wait` says.
    /// `Ok(())`: something changed (or the wait was spurious): look again.
    pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>, wait: Wait) -> Result<(), Gave> {
        match wait.start() {
            Wait::For(_) => unreachable!("started"),
            Wait::No => Err(Gave::Up),
            Wait::Poll(would_wait) => {
                would_wait.set(true);
                Err(Gave::Up)
            }
            Wait::Until(d) => match d.instant() {
                None => {
                    self.cond.wait(guard);
                    Ok(())
                }
                Some(at) => {
                    if Instant::now() >= at || self.cond.wait_until(guard, at).timed_out() {
                        Err(Gave::TimedOut(d.total()))
                    } else {
                        Ok(())
                    }
                }
            },
        }
    }

    /// Waits for a notification with no deadline (a move under way always ends).
    pub(crate) fn wait_forever<T>(&self, guard: &mut MutexGuard<'_, T>) {
        self.cond.wait(guard);
    }
}

/// A caller counted as a waiter; see [`Signal::count`].
pub(crate) struct Counted<'a>(&'a Signal);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, SeqCst);
    }
}
