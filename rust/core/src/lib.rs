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

mod call;
mod calls;
mod config;
mod context;
mod driver;
pub mod embed;
mod error;
mod executor;
mod io;
#[cfg(all(test, loom))]
mod loom_tests;
mod matrix;
mod message;
mod placement;
mod reactor;
pub mod ring;
mod runtime;
mod shard;
mod sleep;
mod stats;
mod sync;
mod timer;
mod wake;

pub use call::{invoke_on_all, submit_to, submit_to_async, Submit};
pub use context::{runtime_id, shard_count, shard_id, spawn_local, stats};
pub use error::{BuildError, Error, Result};
pub use executor::JoinHandle;
pub use io::Async;
pub use runtime::{Builder, Runtime, MAX_SHARDS};
pub use sleep::{sleep, Sleep};
pub use stats::{QueueStats, ShardStats, Stats, StatsReader};
