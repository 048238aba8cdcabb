//! `shardloop._shardloop`: the native half of the `shardloop` package. This
//! file only wires the modules together; each registers its own items.

use pyo3::prelude::*;

mod board;
mod bridge;
mod call;
mod conn;
mod context;
mod driver;
mod errors;
mod future;
mod gil;
mod home;
mod runtime;
mod stall;
mod stats;
mod turn;
mod watchdog;

/// The native module. It is safe without the GIL (free-threaded CPython):
/// `Driver`, `Runtime` and `Connection` hold their `!Send` state through
/// `Home`, which checks the thread on every use (and sends a connection
/// dropped on another shard back to its own); per-thread state lives in
/// the thread's `context`; shared Rust state is atomic or behind a lock;
/// Python objects cross shards only as owned references inside messages.
#[pymodule(gil_used = false)]
fn _shardloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    future::register(m)?;
    bridge::register(m)?;
    call::send::register(m)?;
    call::serve::register(m)?;
    conn::register(m)?;
    driver::register(m)?;
    runtime::register(m)?;
    turn::register(m)?;
    watchdog::register(m)?;
    Ok(())
}
