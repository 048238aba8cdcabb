//! Runtime counters as plain Python dicts, and `StatsReader`, which reads
//! them from any thread.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use shardloop_core::Stats;

use crate::board::Board;
use crate::call::group;

/// `stats()`: the core's counters, each shard's stalls and the service
/// groups' counters of the runtime whose bindings share `board`.
pub(crate) fn runtime_stats<'py>(
    py: Python<'py>,
    stats: &Stats,
    board: &Board,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = to_dict(py, stats, &board.watches)?;
    dict.set_item("groups", group::stats(py, &board.pairs)?)?;
    Ok(dict)
}

/// A runtime's `stats()`, readable from any thread (a metrics exporter's):
/// it holds the counters alone, so it keeps no shard, thread or descriptor
/// alive; once the runtime has stopped it reads their last values.
#[pyclass(frozen, module = "shardloop._shardloop")]
pub(crate) struct StatsReader {
    pub(crate) reader: shardloop_core::StatsReader,
    pub(crate) board: Arc<Board>,
}

#[pymethods]
impl StatsReader {
    /// The runtime's counters, as ``shardloop.stats()`` returns them.
    fn read<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        runtime_stats(py, &self.reader.stats(), &self.board)
    }
}

/// The counters of the core's `stats`, with each shard's stall counts from
/// the runtime's `watches` (zero when stall detection is off).
fn to_dict<'py>(
    py: Python<'py>,
    stats: &Stats,
    watches: &crate::stall::Watches,
) -> PyResult<Bound<'py, PyDict>> {
    let queues = PyList::empty(py);
    for q in &stats.queues {
        let d = PyDict::new(py);
        d.set_item("from", q.from)?;
        d.set_item("to", q.to)?;
        d.set_item("sent", q.sent)?;
        d.set_item("received", q.received)?;
        d.set_item("completed", q.completed)?;
        d.set_item("batches", q.batches)?;
        d.set_item("max_depth", q.max_depth)?;
        d.set_item("max_pending", q.max_pending)?;
        d.set_item("depth", q.depth)?;
        d.set_item("in_flight", q.in_flight)?;
        queues.append(d)?;
    }
    let shards = PyList::empty(py);
    for s in &stats.shards {
        let d = PyDict::new(py);
        d.set_item("shard", s.shard)?;
        d.set_item("polls", s.polls)?;
        d.set_item("tasks_run", s.tasks_run)?;
        d.set_item("sleeps", s.sleeps)?;
        d.set_item("wakeups", s.wakeups)?;
        d.set_item("preempted", s.preempted)?;
        let (stalls, worst) = watches.counts(s.shard).unwrap_or((0, 0.0));
        d.set_item("stalls", stalls)?;
        d.set_item("worst_stall_seconds", worst)?;
        shards.append(d)?;
    }
    let result = PyDict::new(py);
    result.set_item("queues", queues)?;
    result.set_item("shards", shards)?;
    Ok(result)
}
