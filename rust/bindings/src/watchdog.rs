//! The stall watchdog of a runtime: a thread that looks at the shards'
//! [`Watch`]es every half threshold without Python, and has Python report
//! (`shardloop._stall.report`) only when a stall begins and when it ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use crate::stall::{now_ns, watches_of, Watch};

/// The watchdog of one runtime: a thread that looks at the runtime's
/// watches every half threshold, without Python, and calls `report` (with
/// Python) only when a stall begins or ends.
#[pyclass(frozen, module = "shardloop._shardloop")]
pub(crate) struct Watchdog {
    stop: Arc<AtomicBool>,
}

#[pymethods]
impl Watchdog {
    /// Watchdog(runtime_id, threshold, report, /)
    /// --
    ///
    /// Starts watching the shards of runtime `runtime_id`:
    /// `report(shard, seconds, thread_id, serving, ended)` is called from
    /// the watchdog's thread once when a shard's turn passes `threshold`
    /// seconds (`ended` False; `serving` is the plain function being
    /// served, or None) and once when that turn ends (`ended` True,
    /// `seconds` its whole length).
    #[new]
    #[pyo3(signature = (runtime_id, threshold, report, /))]
    fn new(runtime_id: u64, threshold: f64, report: Py<PyAny>) -> PyResult<Self> {
        let threshold = crate::errors::duration("stall_threshold", threshold)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("shardloop-stalls".into())
            .spawn(move || watch_over(runtime_id, threshold, &report, &stopped))
            .map_err(|err| pyo3::exceptions::PyOSError::new_err(err.to_string()))?;
        Ok(Self { stop })
    }

    /// Stops the watchdog (its thread ends at its next look).
    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn watch_over(runtime: u64, threshold: Duration, report: &Py<PyAny>, stop: &AtomicBool) {
    let interval = (threshold / 2).clamp(Duration::from_micros(500), Duration::from_millis(100));
    // The turn reported for each shard, until it ends.
    let mut reported: Vec<Option<u64>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(interval);
        for watch in watches_of(runtime) {
            if reported.len() <= watch.shard {
                reported.resize(watch.shard + 1, None);
            }
            let turn = watch.turn();
            let seen = &mut reported[watch.shard];
            if let Some(stalled) = *seen {
                if turn != stalled {
                    *seen = None;
                    let took = watch.last_stall_ns() as f64 / 1e9;
                    call_report(report, &watch, took, true);
                }
            }
            if turn != 0 && seen.is_none() {
                let took = now_ns().saturating_sub(turn);
                if took >= watch.threshold_ns {
                    *seen = Some(turn);
                    call_report(report, &watch, took as f64 / 1e9, false);
                }
            }
        }
    }
}

fn call_report(report: &Py<PyAny>, watch: &Watch, seconds: f64, ended: bool) {
    crate::gil::attached_unless_exiting(|py| {
        let serving = if ended { None } else { watch.served(py) };
        if let Err(err) = report.call1(py, (watch.shard, seconds, watch.thread, serving, ended)) {
            err.display(py);
        }
    });
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Watchdog>()
}
