//! The settings of a runtime, as [`crate::Builder`] sets them.

use std::time::Duration;

/// Settings of a runtime; see [`Builder`](crate::Builder).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) shards: Option<usize>,
    pub(crate) cpuset: Option<Vec<usize>>,
    pub(crate) pin: bool,
    pub(crate) overprovisioned: bool,
    pub(crate) idle_poll: Duration,
    pub(crate) batch: usize,
    pub(crate) ring_capacity: usize,
    pub(crate) stack_size: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            shards: None,
            cpuset: None,
            pin: true,
            overprovisioned: false,
            idle_poll: Duration::from_micros(200),
            batch: 16,
            ring_capacity: 1024,
            stack_size: None,
        }
    }
}
