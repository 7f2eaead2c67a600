//! The one Python exception type, and running core work with the GIL released while the
//! calling thread keeps reporting progress and noticing Ctrl-C.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use normalize_core::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    normalize_core._core,
    NormalizeError,
    PyException,
    "A checkpoint, plan or write problem. `kind` names the problem, `file` and `tensor` say \
     where (or are None)."
);

/// Converts a core error into `NormalizeError` with `kind`, `file` and `tensor` attributes.
pub fn to_py_err(error: Error) -> PyErr {
    Python::attach(|py| {
        let err = NormalizeError::new_err(error.to_string());
        let value = err.value(py);
        let subject = error.subject();
        let file = subject.file.map(|p| p.display().to_string());
        let attributes = value
            .setattr("kind", subject.kind)
            .and_then(|_| value.setattr("file", file))
            .and_then(|_| value.setattr("tensor", subject.tensor));
        match attributes {
            Ok(()) => err,
            Err(setattr_failure) => setattr_failure,
        }
    })
}

/// Maps core results into Python results.
pub trait OrRaise<T> {
    fn or_raise(self) -> PyResult<T>;
}

impl<T> OrRaise<T> for normalize_core::Result<T> {
    fn or_raise(self) -> PyResult<T> {
        self.map_err(to_py_err)
    }
}

/// How often the waiting thread wakes to report progress and check for signals.
const TICK: Duration = Duration::from_millis(100);

/// Runs `work` on a helper thread without the GIL. Meanwhile the calling thread wakes every
/// tick to pass the bytes done so far to `progress` (a callable taking an int) and to check for
/// signals; an exception from either stops the work and is raised.
pub fn run_cancellable<T, F>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    work: F,
) -> PyResult<T>
where
    T: Send,
    F: FnOnce(&(dyn Fn(u64) -> bool + Sync)) -> normalize_core::Result<T> + Send,
{
    run_cancellable_with(py, progress, &mut || Ok(()), work)
}

/// [`run_cancellable`], also calling `on_tick` (with the GIL, on the calling thread) on every
/// tick and once more after the work ended, whatever its outcome, so that whatever the work
/// reported is always handed over. An exception from `on_tick` stops the work like one from
/// `progress`; the first exception raised wins.
pub fn run_cancellable_with<T, F>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    on_tick: &mut dyn FnMut() -> PyResult<()>,
    work: F,
) -> PyResult<T>
where
    T: Send,
    F: FnOnce(&(dyn Fn(u64) -> bool + Sync)) -> normalize_core::Result<T> + Send,
{
    let done_bytes = AtomicU64::new(0);
    let cancel = AtomicBool::new(false);
    let outcome: (Mutex<Option<normalize_core::Result<T>>>, Condvar) =
        (Mutex::new(None), Condvar::new());
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let result = work(&|n| {
                done_bytes.fetch_add(n, Ordering::Relaxed);
                !cancel.load(Ordering::Relaxed)
            });
            *outcome.0.lock().unwrap() = Some(result);
            outcome.1.notify_all();
        });
        let mut raised: Option<PyErr> = None;
        loop {
            let finished = py.detach(|| {
                let guard = outcome.0.lock().unwrap();
                let (mut guard, _) = outcome
                    .1
                    .wait_timeout_while(guard, TICK, |slot| slot.is_none())
                    .unwrap();
                guard.take()
            });
            let bytes = done_bytes.swap(0, Ordering::Relaxed);
            let reported = match progress {
                Some(callback) if bytes > 0 && raised.is_none() => {
                    callback.call1((bytes,)).map(drop)
                }
                _ => Ok(()),
            };
            // Each runs whatever the others did: `on_tick` must see the end of the work.
            let ticked = on_tick();
            for outcome in [reported, ticked, py.check_signals()] {
                if let Err(e) = outcome {
                    cancel.store(true, Ordering::Relaxed);
                    raised.get_or_insert(e);
                }
            }
            if let Some(result) = finished {
                return match raised {
                    Some(e) => Err(e),
                    None => result.or_raise(),
                };
            }
        }
    })
}
