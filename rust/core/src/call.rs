//! A cross-shard call's whole life: [`submit_to`] sends it, the target
//! serves it ([`Message::run`] of [`Call`]), and the [`Submit`] future
//! settles it on the origin.
//!
//! A call is one allocation. On the origin it gets a slot in the shard's call
//! table and is boxed as a [`Message`]; the box crosses the request ring, runs on
//! the target (inline for a plain closure, as a local task for a future), and
//! crosses back on the response ring carrying its result. The origin then
//! parks the box in the call's slot and wakes the awaiting task, which takes
//! the result out and frees the box, on the shard that allocated it.

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use crate::context::with_shard;
use crate::error::{Error, Result};
use crate::executor::CatchUnwind;
use crate::message::Message;
use crate::shard::Shard;

/// Runs `func` on shard `shard` and resolves to its result. The call is sent
/// at once (the returned future only waits for the answer), so make it on a
/// shard, inside the future given to [`Runtime::block_on`](crate::Runtime::block_on)
/// or a task. On the current shard `func` runs at once (inline, like
/// Seastar's `submit_to`).
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
                CatchUnwind::new(future, id).await
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
    let (count, me) = with_shard(|shard| (shard.shared.count, shard.id))?;
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

/// Marker: the closure returns the value.
pub(crate) struct Value;
/// Marker: the closure returns a future, which runs as a task on the target.
pub(crate) struct Deferred;

/// One cross-shard call. Kept small (the error is boxed): its cache lines
/// cross between the two cores twice per call.
pub(crate) struct Call<F, R, M> {
    origin: usize,
    slot: usize,
    func: Option<F>,
    result: Option<Result<R, Box<Error>>>,
    mode: PhantomData<fn() -> M>,
}

impl<F, R, M> Call<F, R, M> {
    pub(crate) fn new(origin: usize, slot: usize, func: F) -> Self {
        Self {
            origin,
            slot,
            func: Some(func),
            result: None,
            mode: PhantomData,
        }
    }

    fn take_result(any: Box<dyn Any>) -> Result<R>
    where
        F: 'static,
        R: 'static,
        M: 'static,
    {
        let call = any
            .downcast::<Self>()
            .expect("a completed call is read back as the type it was sent as");
        call.result
            .expect("a returned call carries its result")
            .map_err(|e| *e)
    }
}

impl<F, R> Message for Call<F, R, Value>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    fn run(mut self: Box<Self>) {
        let func = self.func.take().expect("a call runs once");
        with_shard(|shard| {
            self.result = Some(
                catch_unwind(AssertUnwindSafe(func))
                    .map_err(|p| Box::new(Error::from_panic(shard.id, p))),
            );
            let origin = self.origin;
            shard.respond(origin, self);
        })
        .expect("messages run on a shard");
    }

    fn complete(self: Box<Self>) {
        complete_call(self.slot, self);
    }
}

impl<F, Fut> Message for Call<F, Fut::Output, Deferred>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future + 'static,
    Fut::Output: Send + 'static,
{
    fn run(mut self: Box<Self>) {
        let func = self.func.take().expect("a call runs once");
        with_shard(|shard| {
            let id = shard.id;
            match catch_unwind(AssertUnwindSafe(func)) {
                Err(payload) => {
                    self.result = Some(Err(Box::new(Error::from_panic(id, payload))));
                    let origin = self.origin;
                    shard.respond(origin, self);
                }
                Ok(future) => shard.spawn(Box::pin(async move {
                    self.result = Some(CatchUnwind::new(future, id).await.map_err(Box::new));
                    let origin = self.origin;
                    with_shard(|shard| shard.respond(origin, self))
                        .expect("a task runs on its shard");
                })),
            }
        })
        .expect("messages run on a shard");
    }

    fn complete(self: Box<Self>) {
        complete_call(self.slot, self);
    }
}

/// Parks a returned call in its slot and wakes whoever awaits it; frees it
/// when nobody does any more.
fn complete_call(slot: usize, call: Box<dyn Any>) {
    let completed = with_shard(|shard| shard.calls.borrow_mut().complete(slot, call))
        .expect("completions run on a shard");
    match completed {
        Ok(Some(waker)) => waker.wake(),
        Ok(None) => {}
        Err(abandoned) => drop(abandoned),
    }
}

enum State<R> {
    Ready(Option<Result<R>>),
    Remote {
        shard: Rc<Shard>,
        slot: usize,
        take: fn(Box<dyn Any>) -> Result<R>,
    },
    Local(Pin<Box<dyn Future<Output = Result<R>>>>),
    Done,
}

/// The result of a call on another shard (or on this one). The call is sent
/// when the `Submit` is made, not when it is first polled; dropping it before
/// it completes abandons the result, and the call itself still runs.
#[must_use = "a call's result is only seen by awaiting it"]
pub struct Submit<R> {
    state: State<R>,
}

impl<R> Submit<R> {
    pub(crate) fn ready(result: Result<R>) -> Self {
        Self {
            state: State::Ready(Some(result)),
        }
    }

    pub(crate) fn local(future: Pin<Box<dyn Future<Output = Result<R>>>>) -> Self {
        Self {
            state: State::Local(future),
        }
    }

    pub(crate) fn remote<F: 'static, M: 'static>(shard: Rc<Shard>, slot: usize) -> Self
    where
        R: 'static,
    {
        Self {
            state: State::Remote {
                shard,
                slot,
                take: Call::<F, R, M>::take_result,
            },
        }
    }
}

impl<R> Unpin for Submit<R> {}

impl<R> Future for Submit<R> {
    type Output = Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        let result = match &mut self.state {
            State::Ready(result) => result.take().expect("Submit polled after completion"),
            State::Local(future) => match future.as_mut().poll(cx) {
                Poll::Ready(result) => result,
                Poll::Pending => return Poll::Pending,
            },
            State::Remote { shard, slot, take } => {
                let message = shard.calls.borrow_mut().poll(*slot, cx);
                match message {
                    Some(message) => take(message),
                    None => return Poll::Pending,
                }
            }
            State::Done => panic!("Submit polled after completion"),
        };
        self.state = State::Done;
        Poll::Ready(result)
    }
}

impl<R> Drop for Submit<R> {
    fn drop(&mut self) {
        if let State::Remote { shard, slot, .. } = &self.state {
            let finished = shard.calls.borrow_mut().abandon(*slot);
            drop(finished);
        }
    }
}
