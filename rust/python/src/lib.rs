//! `shardloop._shardloop`: the native half of the `shardloop` package. This
//! file only wires the modules together; each registers its own items.

use pyo3::prelude::*;

mod bridge;
mod call;
mod driver;
mod errors;
mod gil;
mod runtime;
mod stats;

/// The native module. Not yet audited for free-threaded CPython, so it keeps
/// the GIL on there.
#[pymodule(gil_used = true)]
fn _shardloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    bridge::register(m)?;
    driver::register(m)?;
    runtime::register(m)?;
    Ok(())
}
