//! Cross-shard calls: the work item that travels to the target shard and back,
//! the origin's table of calls awaiting completion, and the [`Submit`] future.
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
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};
use crate::executor::CatchUnwind;
use crate::shard::{with_shard, Shard};

/// A unit of work one shard hands another. The runtime moves the box
/// through the rings; its two methods say what happens at each end. Calls made
/// with [`submit_to`](crate::submit_to) are messages; other layers (such as
/// language bindings) define their own.
pub trait Message: Send + 'static {
    /// Runs on the target shard, inside its poll loop. It must hand `self`
    /// back to its origin with [`respond`](crate::respond), at once or later
    /// from a task of the target shard: the origin counts it as in flight,
    /// and shutdown waits for it, until it is back.
    fn run(self: Box<Self>);

    /// Runs on the origin shard, inside its poll loop, once the message is
    /// back. The box is freed here, on the shard that allocated it.
    fn complete(self: Box<Self>);
}

/// What travels the rings.
pub(crate) type Envelope = Box<dyn Message>;

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

enum Slot {
    Free { next: usize },
    Waiting(Option<Waker>),
    Done(Box<dyn Any>),
    Abandoned,
}

/// The origin's table of calls in flight, indexed by slot.
#[derive(Default)]
pub(crate) struct Calls {
    slots: Vec<Slot>,
    free_head: Option<usize>,
}

impl Calls {
    pub(crate) fn open(&mut self) -> usize {
        match self.free_head {
            Some(index) => {
                let Slot::Free { next } = self.slots[index] else {
                    unreachable!("the free list only holds free slots")
                };
                self.free_head = (next != usize::MAX).then_some(next);
                self.slots[index] = Slot::Waiting(None);
                index
            }
            None => {
                self.slots.push(Slot::Waiting(None));
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, index: usize) {
        self.slots[index] = Slot::Free {
            next: self.free_head.unwrap_or(usize::MAX),
        };
        self.free_head = Some(index);
    }

    /// The call came back. Returns the waker to wake if someone awaits it, or
    /// gives the call back for the caller to drop (outside this table's
    /// borrow) when nobody does any more.
    pub(crate) fn complete(
        &mut self,
        index: usize,
        message: Box<dyn Any>,
    ) -> Result<Option<Waker>, Box<dyn Any>> {
        match &mut self.slots[index] {
            Slot::Waiting(waker) => {
                let waker = waker.take();
                self.slots[index] = Slot::Done(message);
                Ok(waker)
            }
            Slot::Abandoned => {
                self.release(index);
                Err(message)
            }
            Slot::Free { .. } | Slot::Done(_) => unreachable!("a call completes once"),
        }
    }

    fn poll(&mut self, index: usize, cx: &mut Context<'_>) -> Option<Box<dyn Any>> {
        match &mut self.slots[index] {
            Slot::Waiting(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                None
            }
            Slot::Done(_) => {
                let Slot::Done(message) =
                    std::mem::replace(&mut self.slots[index], Slot::Abandoned)
                else {
                    unreachable!()
                };
                self.release(index);
                Some(message)
            }
            Slot::Free { .. } | Slot::Abandoned => unreachable!("only the owner polls a slot"),
        }
    }

    /// The awaiting side went away. Returns the finished call, if it already
    /// came back, for the caller to drop outside this table's borrow.
    fn abandon(&mut self, index: usize) -> Option<Box<dyn Any>> {
        match std::mem::replace(&mut self.slots[index], Slot::Abandoned) {
            Slot::Waiting(_) => None,
            Slot::Done(message) => {
                self.release(index);
                Some(message)
            }
            other => {
                self.slots[index] = other;
                None
            }
        }
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
