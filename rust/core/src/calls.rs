//! The origin's table of cross-shard calls awaiting their answer, indexed
//! by slot: a call that came back is parked in its slot until the awaiting
//! future takes it, and freed at once if nobody awaits it any more.

use std::any::Any;
use std::task::{Context, Waker};

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

    pub(crate) fn poll(&mut self, index: usize, cx: &mut Context<'_>) -> Option<Box<dyn Any>> {
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
    pub(crate) fn abandon(&mut self, index: usize) -> Option<Box<dyn Any>> {
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
