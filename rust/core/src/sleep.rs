//! [`sleep`]: a future that completes after a duration, on the current
//! shard's timers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::context::with_shard;

/// Completes after `duration`, measured on the current shard's timers.
///
/// # Panics
/// When polled outside a shard.
pub fn sleep(duration: Duration) -> Sleep {
    Sleep {
        deadline: Instant::now() + duration,
        key: None,
    }
}

/// The future returned by [`sleep`].
#[derive(Debug)]
pub struct Sleep {
    deadline: Instant,
    key: Option<(Instant, u64)>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            if let Some(key) = self.key.take() {
                let _ = with_shard(|shard| shard.timers.borrow_mut().remove(key));
            }
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        let key = self.key;
        let new_key = with_shard(|shard| {
            let mut timers = shard.timers.borrow_mut();
            match key {
                Some(key) => {
                    timers.update(key, cx.waker());
                    key
                }
                None => (deadline, timers.insert(deadline, cx.waker().clone())),
            }
        })
        .expect("shardloop_core::sleep must be awaited on a shard");
        self.key = Some(new_key);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let _ = with_shard(|shard| shard.timers.borrow_mut().remove(key));
        }
    }
}
