//! Runs the parts of one piece of CPU work (a matrix product split by
//! blocks) on the machine's cores: the caller and long-lived workers take
//! parts until none is left. A product would otherwise start its threads
//! every time, tens of microseconds each, for dozens of products per loss
//! call. The workers sleep on a condition variable between products, so
//! they take no core from other work (PyTorch's, the caller's). One piece
//! of work has the workers at a time; one that finds them busy (another
//! thread's loss call) starts threads of its own, as before.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

thread_local! {
    /// Set while this thread runs one branch of [`both`]: its work stays
    /// on this thread's core.
    static ONE_CORE: Cell<bool> = const { Cell::new(false) };
}

/// `run(part)` for every part in 0..`parts`, in no set order, on the
/// caller's thread and the cores' workers (on the caller's alone inside a
/// branch of [`both`]); returns once all are done. A panic in a part is
/// raised here after every part has finished.
pub(crate) fn run_parts(parts: usize, run: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 || ONE_CORE.get() {
        return (0..parts).for_each(run);
    }
    let free = |p: &'static Pool| match p.idle.try_lock() {
        Ok(guard) => Some(guard),
        // A part's panic unwound through the holder: the workers are fine.
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    match workers().and_then(|p| free(p).map(|guard| (p, guard))) {
        Some((pool, _idle)) => pool.run(parts, run),
        None => std::thread::scope(|scope| {
            for part in 1..parts {
                scope.spawn(move || run(part));
            }
            run(0);
        }),
    }
}

/// `a()` and `b()`; on a two-core machine at once, each on one core with
/// its products unsplit. Two independent pieces of work of about the same
/// size (a target's forward and pred's) use two cores better that way:
/// splitting each product between the cores leaves them about a third
/// idle at VGG's layer sizes (the passes between products run on one, and
/// each product waits for its slower half). With more cores each would
/// get only one of them, so there, and inside a branch, they run one after
/// the other with their products split as usual.
pub(crate) fn both<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    if !together() {
        return (a(), b());
    }
    // What each branch takes (its closure) and gives (its value).
    fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
        m.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    fn put<T>(m: &Mutex<Option<T>>, value: Option<T>) {
        *m.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }
    let (a, b) = (Mutex::new(Some(a)), Mutex::new(Some(b)));
    let (got_a, got_b) = (Mutex::new(None), Mutex::new(None));
    run_parts(2, &|part| {
        ONE_CORE.set(true);
        // Cleared however the branch ends (a panic reaches the caller
        // through run_parts; the thread may be a worker that goes on).
        struct Clear;
        impl Drop for Clear {
            fn drop(&mut self) {
                ONE_CORE.set(false);
            }
        }
        let _clear = Clear;
        match part {
            0 => put(&got_a, take(&a).map(|f| f())),
            _ => put(&got_b, take(&b).map(|f| f())),
        }
    });
    let ran = "run_parts runs every part";
    (take(&got_a).expect(ran), take(&got_b).expect(ran))
}

/// Whether [`both`] here runs its two pieces of work at once (else one
/// after the other): on a two-core machine, outside a branch.
pub(crate) fn together() -> bool {
    super::cores() == 2 && !ONE_CORE.get()
}

/// The workers: one fewer than the cores (the caller is the last), or
/// none on a one-core machine or where threads cannot be started.
fn workers() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<Pool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool = Pool {
            idle: Mutex::new(()),
            job: Mutex::new(Job::default()),
            start: Condvar::new(),
            done: Condvar::new(),
        };
        Some(pool).filter(|_| super::cores() > 1)
    })
    .as_ref()
    .filter(|p| p.started())
}

struct Pool {
    /// Held by the piece of work that has the workers.
    idle: Mutex<()>,
    job: Mutex<Job>,
    /// A job has parts to take.
    start: Condvar,
    /// A job's last part is done.
    done: Condvar,
}

/// The piece of work the workers take parts of.
#[derive(Default)]
struct Job {
    /// The caller's `run`, its lifetime erased: set only while the caller
    /// is in [`Pool::run`], which returns only once no part is running.
    run: Option<Erased>,
    /// Parts handed out so far, of `parts`.
    next: usize,
    parts: usize,
    /// Parts handed out and not yet finished.
    running: usize,
    panic: Option<Box<dyn std::any::Any + Send>>,
}

#[derive(Clone, Copy)]
struct Erased(*const (dyn Fn(usize) + Sync + 'static));

// SAFETY: the closure behind it is Sync, and it is only called while the
// caller that owns it waits in `Pool::run`.
unsafe impl Send for Erased {}

impl Pool {
    /// Starts the workers once; whether they are there.
    fn started(&'static self) -> bool {
        static STARTED: OnceLock<bool> = OnceLock::new();
        *STARTED.get_or_init(|| {
            (1..super::cores()).all(|k| {
                std::thread::Builder::new()
                    .name(format!("perceptual-loss-{k}"))
                    .spawn(move || self.serve())
                    .is_ok()
            })
        })
    }

    fn lock(&self) -> MutexGuard<'_, Job> {
        // A part's panic is caught before the lock is taken again, so the
        // lock is never poisoned by one; take it either way.
        self.job.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker: takes parts of whatever job is posted, forever.
    fn serve(&self) {
        let mut job = self.lock();
        loop {
            while job.next >= job.parts {
                job = self.start.wait(job).unwrap_or_else(|e| e.into_inner());
            }
            job = self.take_part(job);
        }
    }

    /// Runs the next part of the posted job without the lock, then records
    /// it done; returns the lock again.
    fn take_part<'a>(&'a self, mut job: MutexGuard<'a, Job>) -> MutexGuard<'a, Job> {
        let Some(run) = job.run else {
            return job;
        };
        let part = job.next;
        job.next += 1;
        job.running += 1;
        drop(job);
        // SAFETY: `run` is the posted job's, whose caller waits in `run`
        // until `running` is back to 0, after this part is counted done.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*run.0)(part) }));
        let mut job = self.lock();
        job.running -= 1;
        if let Err(panic) = result {
            job.panic.get_or_insert(panic);
        }
        if job.running == 0 && job.next >= job.parts {
            self.done.notify_all();
        }
        job
    }

    /// Posts `run` over `parts`, takes parts too, and waits for the rest.
    fn run(&self, parts: usize, run: &(dyn Fn(usize) + Sync)) {
        // SAFETY (of the lifetime erased here): `run` is cleared below
        // before this returns, once no part is running.
        type Run<'a> = *const (dyn Fn(usize) + Sync + 'a);
        let erased = Erased(unsafe { std::mem::transmute::<Run<'_>, Run<'static>>(run) });
        let mut job = self.lock();
        *job = Job {
            run: Some(erased),
            next: 0,
            parts,
            running: 0,
            panic: None,
        };
        self.start.notify_all();
        while job.next < job.parts {
            job = self.take_part(job);
        }
        while job.running > 0 {
            job = self.done.wait(job).unwrap_or_else(|e| e.into_inner());
        }
        job.run = None;
        let panic = job.panic.take();
        drop(job);
        if let Some(panic) = panic {
            resume_unwind(panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every part runs once, from several threads at once (one has the
    /// workers, the others start their own), and a part's panic reaches
    /// the caller after the other parts are done.
    #[test]
    fn every_part_runs_once_and_a_panic_reaches_the_caller() {
        std::thread::scope(|scope| {
            for t in 0..4 {
                scope.spawn(move || {
                    for parts in [0, 1, 2, 3, 7] {
                        let hits: Vec<AtomicUsize> =
                            (0..parts).map(|_| AtomicUsize::new(0)).collect();
                        run_parts(parts, &|p| {
                            hits[p].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(
                            hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                            "thread {t}, {parts} parts"
                        );
                    }
                });
            }
        });
        let done = AtomicUsize::new(0);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            run_parts(4, &|p| {
                if p == 2 {
                    panic!("part 2");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(caught.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 3);
        // The workers still serve after a panic.
        let hits = AtomicUsize::new(0);
        run_parts(5, &|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 5);
    }

    /// `both` gives each branch's value; inside a branch (on a two-core
    /// machine) every part of a product runs on the branch's own thread, and
    /// a nested `both` runs in order; a branch's panic reaches the caller,
    /// and afterwards the caller's products are split again.
    #[test]
    fn both_gives_each_value_and_keeps_a_branch_on_its_core() {
        let parts_on_own_thread = || {
            let me = std::thread::current().id();
            let others = AtomicUsize::new(0);
            run_parts(8, &|_| {
                if std::thread::current().id() != me {
                    others.fetch_add(1, Ordering::Relaxed);
                }
            });
            others.load(Ordering::Relaxed) == 0
        };
        let (a, b) = both(
            || (1 + 2, parts_on_own_thread()),
            || (both(|| "x", || "y"), parts_on_own_thread()),
        );
        assert_eq!((a.0, b.0), (3, ("x", "y")));
        if crate::ops::cores() == 2 {
            assert!(a.1 && b.1, "a branch's parts stayed on its thread");
        }
        for branch in [0, 1] {
            let caught = catch_unwind(AssertUnwindSafe(|| {
                both(
                    || assert!(branch != 0, "branch 0"),
                    || assert!(branch != 1, "branch 1"),
                )
            }));
            assert!(caught.is_err(), "branch {branch}'s panic");
        }
        assert!(!ONE_CORE.get(), "the caller's products are split again");
    }
}
