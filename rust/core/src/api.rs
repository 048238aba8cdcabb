//! The free functions that act on the current thread's shard: cross-shard
//! calls, messages, local tasks, counters.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::call::{Call, Deferred, Message, Submit, Value};
use crate::error::{Error, Result};
use crate::executor::{joinable, JoinHandle};
use crate::stats::Stats;

use crate::shard::with_shard;

/// Runs `func` on shard `shard` and resolves to its result. The call is sent
/// at once (the returned future only waits for the answer), so make it on a
/// shard, inside the future given to [`Runtime::block_on`] or a task. On the
/// current shard `func` runs at once (inline, like Seastar's `submit_to`).
///
/// Fails, without sending anything, with [`Error::NoSuchShard`] for an index
/// out of range, [`Error::Closed`] once shutdown has begun, and
/// [`Error::NotOnShard`] off a shard. A panic in `func` comes back as
/// [`Error::Panicked`].
pub fn submit_to<F, R>(shard: usize, func: F) -> Submit<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let submitted = with_shard(|current| {
        current.check_target(shard)?;
        if shard == current.id {
            // What this turn already sent goes out before the call runs: it
            // may run long, and the other shards should not wait for it.
            current.flush_all();
            let result =
                catch_unwind(AssertUnwindSafe(func)).map_err(|p| Error::from_panic(shard, p));
            return Ok(Submit::ready(result));
        }
        let slot = current.calls.borrow_mut().open();
        current.send_request(
            shard,
            Box::new(Call::<F, R, Value>::new(current.id, slot, func)),
        );
        Ok(Submit::remote::<F, Value>(current.clone(), slot))
    });
    submitted
        .and_then(|s| s)
        .unwrap_or_else(|e| Submit::ready(Err(e)))
}

/// Like [`submit_to`], for a closure that returns a future: the closure is
/// sent to `shard`, and the future it returns runs there as a local task (so
/// it need not be `Send`) until it completes.
pub fn submit_to_async<F, Fut>(shard: usize, func: F) -> Submit<Fut::Output>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future + 'static,
    Fut::Output: Send + 'static,
{
    let submitted = with_shard(|current| {
        current.check_target(shard)?;
        if shard == current.id {
            let id = current.id;
            return Ok(Submit::local(Box::pin(async move {
                let future =
                    catch_unwind(AssertUnwindSafe(func)).map_err(|p| Error::from_panic(id, p))?;
                crate::executor::CatchUnwind::new(future, id).await
            })));
        }
        let slot = current.calls.borrow_mut().open();
        let call = Call::<F, Fut::Output, Deferred>::new(current.id, slot, func);
        current.send_request(shard, Box::new(call));
        Ok(Submit::remote::<F, Deferred>(current.clone(), slot))
    });
    submitted
        .and_then(|s| s)
        .unwrap_or_else(|e| Submit::ready(Err(e)))
}

/// Runs `func` on every shard and returns the results in shard order.
pub async fn invoke_on_all<F, R>(func: F) -> Result<Vec<R>>
where
    F: FnOnce() -> R + Clone + Send + 'static,
    R: Send + 'static,
{
    let count = shard_count().ok_or(Error::NotOnShard)?;
    let me = shard_id().ok_or(Error::NotOnShard)?;
    // The other shards get their calls first: this shard's own call runs
    // inline, and would otherwise hold the others back.
    let mut calls: Vec<Option<Submit<R>>> = (0..count)
        .map(|shard| (shard != me).then(|| submit_to(shard, func.clone())))
        .collect();
    calls[me] = Some(submit_to(me, func));
    let mut results = Vec::with_capacity(count);
    for call in calls.into_iter().flatten() {
        results.push(call.await?);
    }
    Ok(results)
}

/// The index of the current shard, or `None` off a shard.
pub fn shard_id() -> Option<usize> {
    with_shard(|shard| shard.id).ok()
}

/// A number that tells the runtime of the current shard from every other
/// runtime of the process (runtimes are numbered as they are built, never
/// reusing a number), or `None` off a shard. State made on one runtime can
/// check it to refuse use on a later one.
pub fn runtime_id() -> Option<u64> {
    with_shard(|shard| shard.shared.serial).ok()
}

/// The number of shards of the current runtime, or `None` off a shard.
pub fn shard_count() -> Option<usize> {
    with_shard(|shard| shard.shared.count).ok()
}

/// A snapshot of the current runtime's counters, or `None` off a shard.
pub fn stats() -> Option<Stats> {
    with_shard(|shard| shard.shared.stats()).ok()
}

/// Starts `future` as a task of the current shard; it runs, and finishes, on
/// this shard.
///
/// # Panics
/// Off a shard.
pub fn spawn_local<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    with_shard(|shard| {
        let (task, handle) = joinable(future, shard.id);
        shard.spawn(task);
        handle
    })
    .expect("spawn_local must be called on a shard")
}

/// Sends `message` to shard `target`, where its [`Message::run`] runs; it
/// comes back to [`Message::complete`] here. Fails, sending nothing, with
/// [`Error::NoSuchShard`], [`Error::Closed`] or [`Error::NotOnShard`]. A
/// message to the current shard runs at once.
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

/// Makes the current shard's [`Driver::wait`] return after this turn: for
/// messages that leave work for the driving loop. Does nothing off a shard.
pub fn wake_driver() {
    let _ = with_shard(|shard| shard.attention.set(true));
}

/// Whether `target` is a shard that can receive a call now.
pub fn check_target(target: usize) -> Result<()> {
    with_shard(|shard| shard.check_target(target))?
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
