//! shardloop-core: Seastar's shard-per-core model in Rust.
//!
//! One pinned thread per core ("shard"), each running its own poll loop; no
//! locks between shards; shards talk only through single-producer/single-
//! consumer rings, one request ring and one response ring per ordered pair.
//!
//! ```
//! use shardloop_core::{submit_to, Runtime};
//!
//! let runtime = Runtime::builder().shards(2).pin(false).build().unwrap();
//! let answer = runtime.block_on(async {
//!     submit_to(1, || 6 * 7).await
//! });
//! assert_eq!(answer, Ok(42));
//! ```
#![warn(missing_docs)]

mod api;
mod call;
mod driver;
mod error;
mod executor;
mod io;
pub mod matrix;
pub mod ring;
mod runtime;
mod shard;
mod stats;
mod sync;
mod timer;
pub mod wake;

pub use api::{
    check_target, count_tasks, flush, invoke_on_all, respond, runtime_id, send, shard_count,
    shard_id, spawn_local, stats, submit_to, submit_to_async, wake_driver,
};
pub use call::{Message, Submit};
pub use driver::{Activation, Driver};
pub use error::{Error, Result};
pub use executor::JoinHandle;
pub use io::Async;
pub use runtime::{Builder, Runtime, MAX_SHARDS};
pub use stats::{QueueStats, ShardStats, Stats};
pub use timer::{sleep, Sleep};
