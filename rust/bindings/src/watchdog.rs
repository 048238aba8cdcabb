//! The stall watchdog of a runtime: a thread that looks at the shards'
//! [`Watch`]es every half threshold without Python, and has Python report
//! (`shardloop._stall.report`) only when a stall begins and when it ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use crate::driver::Driver;
use crate::stall::{now_ns, Watch, Watches};

/// The watchdog of one runtime: a thread that looks at the runtime's
/// watches every half threshold, without Python, and calls `report` (with
/// Python) only when a stall begins or ends.
#[pyclass(frozen, module = "shardloop._shardloop")]
pub(crate) struct Watchdog {
    stop: Arc<AtomicBool>,
}

#[pymethods]
impl Watchdog {
    /// Watchdog(driver, threshold, report, /)
    /// --
    ///
    /// Starts watching the shards of `driver`'s runtime:
    /// `report(shard, seconds, thread_id, serving, ended)` is called from
    /// the watchdog's thread once when a shard's turn passes `threshold`
    /// seconds (`ended` False; `serving` is the plain function being
    /// served, or None) and once when that turn ends (`ended` True,
    /// `seconds` its whole length).
    #[new]
    #[pyo3(signature = (driver, threshold, report, /))]
    fn new(driver: &Driver, threshold: f64, report: Py<PyAny>) -> PyResult<Self> {
        let watches = driver.board()?.watches.clone();
        let threshold = crate::errors::duration("stall_threshold", threshold)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("shardloop-stalls".into())
            .spawn(move || watch_over(&watches, threshold, &report, &stopped))
            .map_err(|err| pyo3::exceptions::PyOSError::new_err(err.to_string()))?;
        Ok(Self { stop })
    }

    /// Stops the watchdog (its thread ends at its next look).
    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn watch_over(watches: &Watches, threshold: Duration, report: &Py<PyAny>, stop: &AtomicBool) {
    let interval = (threshold / 2).clamp(Duration::from_micros(500), Duration::from_millis(100));
    // The turn reported for each shard, until it ends.
    let mut reported: Vec<Option<u64>> = Vec::new();
    crate::gil::register_thread();
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(interval);
        for watch in &watches.live() {
            if reported.len() <= watch.shard {
                reported.resize(watch.shard + 1, None);
            }
            let turn = watch.turn();
            let seen = &mut reported[watch.shard];
            if let Some(stalled) = *seen {
                if turn != stalled {
                    *seen = None;
                    report_end(report, watch);
                }
            }
            if turn != 0 && seen.is_none() {
                let took = now_ns().saturating_sub(turn);
                if took >= watch.threshold_ns {
                    *seen = report_stall(report, watch, turn).then_some(turn);
                }
            }
        }
    }
}

/// Reports that `watch`'s shard has been in turn `turn` too long, unless
/// the turn ended while this thread waited for Python (with the GIL, a
/// stalled shard may hold it): then it reports the stall as ended, and
/// returns false.
fn report_stall(report: &Py<PyAny>, watch: &Watch, turn: u64) -> bool {
    crate::gil::attached_unless_exiting(|py| {
        let serving = watch.served(py);
        // Looked at with Python attached: the stack taken now is this turn's.
        if watch.turn() != turn {
            drop(serving);
            call(py, report, watch, watch.last_stall_ns(), None, true);
            return false;
        }
        let took = now_ns().saturating_sub(turn);
        call(py, report, watch, took, serving, false);
        true
    })
    .unwrap_or(false)
}

/// Reports that `watch`'s shard's stall ended.
fn report_end(report: &Py<PyAny>, watch: &Watch) {
    crate::gil::attached_unless_exiting(|py| {
        call(py, report, watch, watch.last_stall_ns(), None, true);
    });
}

fn call(
    py: Python<'_>,
    report: &Py<PyAny>,
    watch: &Watch,
    nanos: u64,
    serving: Option<Py<PyAny>>,
    ended: bool,
) {
    let seconds = nanos as f64 / 1e9;
    if let Err(err) = report.call1(py, (watch.shard, seconds, watch.thread, serving, ended)) {
        err.display(py);
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Watchdog>()
}
