//! What the shards of one runtime share in the bindings: the counters of
//! their service groups' pairs and their stall watches. The runtime makes
//! it and hands it to every shard it installs; each runtime has its own, so
//! that no lock is shared by the whole process (one held by a thread at a
//! `fork` would stay held in the child for good).

use std::sync::Arc;

use crate::call::group::Pairs;
use crate::stall::Watches;

#[derive(Default)]
pub(crate) struct Board {
    pub(crate) pairs: Arc<Pairs>,
    pub(crate) watches: Arc<Watches>,
}
