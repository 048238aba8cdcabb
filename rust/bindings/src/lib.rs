//! `shardloop._shardloop`: the native half of the `shardloop` package. This
//! file only wires the modules together; each registers its own items.

use pyo3::prelude::*;

mod bridge;
mod call;
mod conn;
mod driver;
mod errors;
mod gil;
mod home;
mod load;
mod runtime;
mod stats;

/// The native module. It is safe without the GIL (free-threaded CPython):
/// `Driver` and `Runtime` are frozen tokens whose state stays in the owning
/// thread's locals; the done-callback classes are `unsendable` and run on
/// their own shard; shared Rust state is atomic or behind a lock; Python
/// objects cross shards only as owned references inside messages.
#[pymodule(gil_used = false)]
fn _shardloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    bridge::register(m)?;
    call::register(m)?;
    conn::register(m)?;
    driver::register(m)?;
    load::register(m)?;
    runtime::register(m)?;
    Ok(())
}
