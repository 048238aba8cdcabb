//! `load(...)`: the load generator of `python -m shardloop load`, run with
//! the GIL released (the `shardloop-load` crate does the work).

use std::net::ToSocketAddrs;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use shardloop_load::{Options, Protocol};

/// load(host, port, protocol="lookup", connections=64, seconds=5.0, size=64, keys=100000, progress=True, pipeline=1)
/// --
///
/// Drives an echo, lookup or memcached server with `connections` closed-loop
/// connections for `seconds`, each with `pipeline` requests in flight;
/// returns requests, errors, seconds, requests per second and the
/// p50/p99/p999 latencies in microseconds.
#[pyfunction]
#[pyo3(signature = (host, port, protocol="lookup", connections=64, seconds=5.0, size=64, keys=100_000, progress=true, pipeline=1))]
#[allow(clippy::too_many_arguments)]
fn load<'py>(
    py: Python<'py>,
    host: &str,
    port: u16,
    protocol: &str,
    connections: usize,
    seconds: f64,
    size: usize,
    keys: u32,
    progress: bool,
    pipeline: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let protocol = match protocol {
        "echo" if size > 0 => Protocol::Echo { size },
        "echo" => return Err(PyValueError::new_err("size must be at least 1")),
        "lookup" | "memcached" if keys == 0 => {
            return Err(PyValueError::new_err("keys must be at least 1"))
        }
        "lookup" => Protocol::Lookup { keys },
        "memcached" => Protocol::Memcached { keys, size },
        other => {
            return Err(PyValueError::new_err(format!(
                "protocol must be 'echo', 'lookup' or 'memcached', not {other:?}"
            )))
        }
    };
    if connections == 0 || pipeline == 0 || !(seconds > 0.0 && seconds.is_finite()) {
        return Err(PyValueError::new_err(
            "connections, pipeline and seconds must be positive",
        ));
    }
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| PyValueError::new_err(format!("no address for {host}")))?;
    let options = Options {
        addr,
        protocol,
        connections,
        duration: crate::errors::duration("seconds", seconds)?,
        pipeline,
        progress,
    };
    let report = py.detach(|| shardloop_load::run(&options))?;
    let micros = |p: f64| {
        report
            .percentile(p)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
    };
    let summary = PyDict::new(py);
    summary.set_item("requests", report.requests)?;
    summary.set_item("errors", report.errors)?;
    summary.set_item("seconds", report.elapsed.as_secs_f64())?;
    summary.set_item("requests_per_second", report.rate())?;
    summary.set_item("p50_us", micros(50.0))?;
    summary.set_item("p99_us", micros(99.0))?;
    summary.set_item("p999_us", micros(99.9))?;
    Ok(summary)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(load, m)?)
}
