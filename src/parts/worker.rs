//! The thread that prefetches a stream's host parts: one thread, started at
//! a stream's first host prefetch and woken for each next part, and kept by
//! the [`Parted`](super::Parted) model for its next pass.
//!
//! A thread started per part waits for a core: while the compute fills every
//! core, a new thread was first scheduled 2–3 ms after it was started (in a
//! trace on 2 cores), and the disk idled meanwhile. A thread that sleeps on a
//! channel is woken at once.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::error::panic_message;

type Job = Box<dyn FnOnce() + Send>;

/// A prefetch thread; dropping it ends the thread, after the jobs sent.
pub(super) struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// The answer to a job sent with [`Worker::run`].
pub(super) type Answer<T> = mpsc::Receiver<std::result::Result<T, String>>;

impl Worker {
    /// Starts the thread, named `name`; `None` if it could not be started.
    pub(super) fn start(name: String) -> Option<Worker> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                for job in queue {
                    job();
                }
            })
            .ok()?;
        Some(Worker { jobs: Some(jobs), thread: Some(thread) })
    }

    /// Runs `f` on the thread. The answer is its value, or the message of
    /// the panic it raised (the thread goes on with the next job).
    pub(super) fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Answer<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let out =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_message(&*p));
            let _ = tx.send(out);
        });
        if let Some(jobs) = &self.jobs {
            // A send fails only if the thread is gone; the answer's sender is
            // then dropped with the job, and waiting for it says so.
            let _ = jobs.send(job);
        }
        rx
    }

    /// The thread's id.
    #[cfg(test)]
    pub(super) fn id(&self) -> std::thread::ThreadId {
        self.thread.as_ref().expect("joined only when dropped").thread().id()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_on_one_thread_and_a_panic_is_an_answer() {
        let w = Worker::start("sire-test-worker".into()).unwrap();
        let a = w.run(|| std::thread::current().name().map(str::to_owned));
        let b = w.run(|| -> u32 { panic!("boom") });
        let c = w.run(|| 7);
        assert_eq!(a.recv().unwrap().unwrap().as_deref(), Some("sire-test-worker"));
        assert!(b.recv().unwrap().unwrap_err().contains("boom"));
        assert_eq!(c.recv().unwrap().unwrap(), 7);
        drop(w);
    }
}
