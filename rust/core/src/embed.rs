//! For embedders: what another event loop (Python's asyncio, say) needs to
//! drive a shard and to send its own kinds of messages between shards.
//!
//! A [`Driver`] turns a shard's loop from the embedder's loop. A
//! [`Message`] is the embedder's unit of work between shards: [`send`] it to
//! a target, where its `run` executes; it comes back with [`respond`] to
//! its origin's `complete`. The other hooks tell the shard about work the
//! embedder does for it.

use crate::context::with_shard;
use crate::error::Result;

pub use crate::driver::{Activation, Driver};
pub use crate::message::Message;

/// Sends `message` to shard `target`, where its [`Message::run`] runs; it
/// comes back to [`Message::complete`] here. Fails, sending nothing, with
/// [`Error::NoSuchShard`](crate::Error::NoSuchShard),
/// [`Error::Closed`](crate::Error::Closed) or
/// [`Error::NotOnShard`](crate::Error::NotOnShard). A message to the
/// current shard runs at once.
pub fn send(target: usize, message: Box<dyn Message>) -> Result<()> {
    with_shard(|shard| {
        shard.check_target(target)?;
        if target == shard.id {
            message.run();
        } else {
            shard.send_request(target, message);
        }
        Ok(())
    })?
}

/// Hands a message that ran here back to its `origin` shard (see
/// [`Message::run`]).
///
/// # Panics
/// Off a shard.
pub fn respond(origin: usize, message: Box<dyn Message>) {
    with_shard(|shard| shard.respond(origin, message)).expect("respond must be called on a shard");
}

/// Whether `target` is a shard that can receive a call now.
pub fn check_target(target: usize) -> Result<()> {
    with_shard(|shard| shard.check_target(target))?
}

/// Makes the current shard's [`Driver::wait`] return after this turn: for
/// messages that leave work for the driving loop. Does nothing off a shard.
pub fn wake_driver() {
    let _ = with_shard(|shard| shard.attention.set(true));
}

/// Counts `n` units of work run by the driving loop in the current shard's
/// `tasks_run` counter. Does nothing off a shard.
pub fn count_tasks(n: u64) {
    let _ = with_shard(|shard| shard.counters().tasks_run.add(n));
}

/// Pushes the current shard's queued messages onto their rings now, instead
/// of at the end of this turn of its loop (for a caller about to run long).
/// Does nothing off a shard.
pub fn flush() {
    let _ = with_shard(|shard| shard.flush_all());
}
