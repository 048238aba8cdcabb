//! The bridge between Rust futures and Python awaitables on a shard.
//!
//! * [`spawn_for_python`] runs a Rust future as a task of the shard's own
//!   executor and gives Python a future of its output (a `ShardFuture`).
//!   The task is woken through the shard's executor (a waker used on another
//!   thread goes through the shard's remote-wake queue), and the future is
//!   settled on the shard's loop thread through the inbox: nothing goes
//!   through `call_soon_threadsafe`.
//! * [`PyAwait`] is a Rust future that completes when an asyncio future of
//!   this shard does: its done-callback stores the outcome and wakes the
//!   Rust task, so the task is polled without the GIL.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use pyo3::exceptions::asyncio::CancelledError;
use pyo3::intern;
use pyo3::prelude::*;

use crate::context;
use crate::future::ShardFuture;
use crate::home::Home;

/// Runs `future` on the current shard's executor; returns a future
/// on `event_loop` that resolves with what its output produces.
pub(crate) fn spawn_for_python<'py, F>(
    py: Python<'py>,
    event_loop: &Bound<'py, PyAny>,
    future: F,
) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = context::Produce> + 'static,
{
    let py_future = Bound::new(py, ShardFuture::new(event_loop.clone().unbind(), None))?;
    let target = py_future.clone().unbind();
    drop(shardloop_core::spawn_local(async move {
        let produce = future.await;
        context::settle_later(target, produce);
    }));
    Ok(py_future.into_any())
}

struct AwaitState {
    outcome: Option<PyResult<Py<PyAny>>>,
    waker: Option<Waker>,
}

/// A Rust future of the outcome of an asyncio future of this shard.
pub(crate) struct PyAwait {
    state: Rc<RefCell<AwaitState>>,
}

impl PyAwait {
    pub(crate) fn new(future: &Bound<'_, PyAny>) -> PyResult<Self> {
        let state = Rc::new(RefCell::new(AwaitState {
            outcome: None,
            waker: None,
        }));
        let shard = shardloop_core::shard_id().ok_or_else(crate::errors::not_on_shard)?;
        let callback = Bound::new(
            future.py(),
            OnDone {
                state: Home::new(state.clone(), shard, drop, "a relay's callback"),
            },
        )?;
        future.call_method1(intern!(future.py(), "add_done_callback"), (callback,))?;
        Ok(Self { state })
    }
}

impl Future for PyAwait {
    type Output = PyResult<Py<PyAny>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.state.borrow_mut();
        match state.outcome.take() {
            Some(outcome) => Poll::Ready(outcome),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The done-callback behind [`PyAwait`]; runs on its shard, and may be
/// dropped anywhere (see `Home`).
#[pyclass(frozen)]
struct OnDone {
    state: Home<RefCell<AwaitState>>,
}

#[pymethods]
impl OnDone {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = future.py();
        let outcome = if future.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
            Err(CancelledError::new_err("the awaited future was cancelled"))
        } else {
            future
                .call_method0(intern!(py, "result"))
                .map(Bound::unbind)
        };
        let waker = {
            let mut state = self.state.local()?.borrow_mut();
            state.outcome = Some(outcome);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

/// sleep(delay, /)
/// --
///
/// Waits `delay` seconds on the shard's Rust timers: a Rust future awaited
/// from Python.
#[pyfunction]
#[pyo3(signature = (delay, /))]
fn sleep(py: Python<'_>, delay: f64) -> PyResult<Bound<'_, PyAny>> {
    let event_loop = context::running_loop(py)?;
    let delay = crate::errors::duration("the delay", delay.max(0.0))?;
    spawn_for_python(py, &event_loop, async move {
        shardloop_core::sleep(delay).await;
        Box::new(|py: Python<'_>| Ok(py.None())) as context::Produce
    })
}

/// relay(awaitable, /)
/// --
///
/// Awaits `awaitable` from a Rust task of this shard and resolves the
/// returned future with its outcome: a Python awaitable driven from Rust,
/// and the Rust task's output handed back to Python.
#[pyfunction]
#[pyo3(signature = (awaitable, /))]
fn relay<'py>(py: Python<'py>, awaitable: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let event_loop = context::running_loop(py)?;
    static ENSURE_FUTURE: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    let future = ENSURE_FUTURE
        .import(py, "asyncio", "ensure_future")?
        .call1((awaitable,))?;
    let waiting = PyAwait::new(&future)?;
    spawn_for_python(py, &event_loop, async move {
        let outcome = waiting.await;
        Box::new(move |_: Python<'_>| outcome) as context::Produce
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sleep, m)?)?;
    m.add_function(wrap_pyfunction!(relay, m)?)
}
