//! Panics on the pool's threads: a process-wide panic hook, installed while a
//! pool builds or runs, that records a panic's message, location and backtrace
//! for threads that asked for it, and hands every other panic to the hook that
//! was there before. The last user out restores that hook.

use std::backtrace::{Backtrace, BacktraceStatus};
use std::cell::{Cell, RefCell};
use std::panic::{self, PanicHookInfo};
use std::sync::Arc;

use parking_lot::Mutex;

/// What a panic said, where, and its backtrace.
#[derive(Debug)]
pub(crate) struct Captured {
    pub(crate) message: String,
    pub(crate) location: Option<String>,
    pub(crate) backtrace: Option<Box<Backtrace>>,
}

impl Captured {
    /// `message` at `location`, in one line.
    pub(crate) fn describe(&self) -> String {
        match &self.location {
            Some(l) => format!("{} (at {l})", self.message),
            None => self.message.clone(),
        }
    }
}

thread_local! {
    /// Whether panics on this thread are captured (the pool's own threads).
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The last panic captured on this thread.
    static LAST: RefCell<Option<Captured>> = const { RefCell::new(None) };
}

type Hook = Box<dyn Fn(&PanicHookInfo<'_>) + Send + Sync + 'static>;

/// How many installs are alive, and the hook to restore after the last
/// (`Some` while ours is installed).
struct State {
    users: usize,
    previous: Option<Arc<Hook>>,
}

static STATE: Mutex<State> = Mutex::new(State { users: 0, previous: None });

/// Keeps the capturing hook installed while alive.
pub(crate) struct HookGuard(());

/// Installs the capturing hook (once for all live guards).
pub(crate) fn install() -> HookGuard {
    let mut st = STATE.lock();
    if st.previous.is_none() {
        let previous: Arc<Hook> = Arc::new(panic::take_hook());
        let chained = Arc::clone(&previous);
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(Cell::get) {
                let captured = capture(info);
                LAST.with(|l| *l.borrow_mut() = Some(captured));
            } else {
                chained(info);
            }
        }));
        st.previous = Some(previous);
    }
    st.users += 1;
    HookGuard(())
}

impl Drop for HookGuard {
    fn drop(&mut self) {
        let mut st = STATE.lock();
        st.users -= 1;
        // The hook cannot be swapped by a panicking thread: ours stays (it
        // hands other threads' panics on) until a later guard drops normally.
        if st.users == 0 && !std::thread::panicking() {
            if let Some(previous) = st.previous.take() {
                // Drops our hook, which holds the other reference to `previous`.
                drop(panic::take_hook());
                match Arc::try_unwrap(previous) {
                    Ok(hook) => panic::set_hook(hook),
                    Err(shared) => panic::set_hook(Box::new(move |info| shared(info))),
                }
            }
        }
    }
}

fn capture(info: &PanicHookInfo<'_>) -> Captured {
    let message = crate::error::panic_message(info.payload());
    let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
    // Always captured (a panic is rare; symbols are resolved only when printed).
    let bt = Backtrace::force_capture();
    let backtrace = (bt.status() == BacktraceStatus::Captured).then(|| Box::new(bt));
    Captured { message, location, backtrace }
}

/// Captures the panics of the current thread from now on (while a hook is installed).
pub(crate) fn capture_this_thread() {
    CAPTURING.with(|c| c.set(true));
}

/// Forgets the last panic captured on this thread.
pub(crate) fn clear() {
    LAST.with(|l| l.borrow_mut().take());
}

/// The last panic captured on this thread, if any; `payload` gives the message
/// when the hook did not see it.
pub(crate) fn take(payload: Option<&(dyn std::any::Any + Send)>) -> Captured {
    LAST.with(|l| l.borrow_mut().take()).unwrap_or_else(|| Captured {
        message: payload.map(crate::error::panic_message).unwrap_or_else(|| "unknown panic".into()),
        location: None,
        backtrace: None,
    })
}
