//! One byte budget for the request bodies that the client-facing listeners hold at once
//! (`limits.max_in_flight_bytes`): the QUIC client port, HTTP and Protocol Buffers take from
//! the same one, so a flood on one of them cannot hold more than the budget beside what the
//! others hold. A body takes its share before it is read, and gives it back when its request
//! is answered; without budget it is not read (QUIC and PB: the sender waits on flow control)
//! or refused after a bounded wait, naming the limit (HTTP 503, a PB error).
//!
//! Peer traffic has a budget of its own (the peer listener's), so a coordinator that holds
//! client budget never waits on budget its replicas need.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of a body one permit stands for.
pub const UNIT_BYTES: u32 = crate::net::frame::BUDGET_UNIT_BYTES;

/// Why a body got no budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "this node holds {limit_bytes} bytes of request bodies at most (limits.max_in_flight_bytes), and a body of {body_bytes} bytes found no room for {waited_ms} ms; retry"
    )]
    Exhausted {
        body_bytes: u64,
        limit_bytes: u64,
        waited_ms: u64,
    },
    #[error("the node is shutting down")]
    Closed,
}

/// A share of the client-facing listeners' byte budget; cheap to clone.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    permits: Arc<Semaphore>,
    limit_bytes: u64,
}

impl ByteBudget {
    /// A budget of `limit_bytes`, in permits of [`UNIT_BYTES`].
    pub fn new(limit_bytes: u64) -> Self {
        let units = limit_bytes.div_ceil(u64::from(UNIT_BYTES));
        let permits = usize::try_from(units)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        ByteBudget {
            permits: Arc::new(Semaphore::new(permits)),
            limit_bytes,
        }
    }

    /// The permits themselves, for the QUIC frame reader.
    pub fn permits(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Takes the share of a body of `body_bytes` (none for a body of at most
    /// [`crate::net::SMALL_FRAME_BYTES`]: small requests are never held up behind large ones,
    /// and the request limits bound what they hold), waiting up to `wait` for room. The share
    /// comes back when the returned permit drops.
    pub async fn take(
        &self,
        body_bytes: u64,
        wait: Duration,
    ) -> Result<Option<OwnedSemaphorePermit>, BudgetError> {
        if body_bytes <= crate::net::SMALL_FRAME_BYTES as u64 {
            return Ok(None);
        }
        // A body larger than the whole budget takes all of it (the listeners' own size
        // limits, checked against the budget in the config, keep this from happening).
        let units = body_bytes
            .div_ceil(u64::from(UNIT_BYTES))
            .min(self.limit_bytes.div_ceil(u64::from(UNIT_BYTES)))
            .min(u64::from(u32::MAX)) as u32;
        match tokio::time::timeout(wait, self.permits.clone().acquire_many_owned(units)).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            Ok(Err(_)) => Err(BudgetError::Closed),
            Err(_) => Err(BudgetError::Exhausted {
                body_bytes,
                limit_bytes: self.limit_bytes,
                waited_ms: wait.as_millis() as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_body_waits_for_room_and_is_refused_naming_the_limit_when_none_comes() {
        let budget = ByteBudget::new(1024 * 1024);
        assert!(
            budget.take(100, Duration::ZERO).await.unwrap().is_none(),
            "a small body takes nothing"
        );
        let first = budget
            .take(768 * 1024, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(first.is_some());
        let refused = budget
            .take(512 * 1024, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("limits.max_in_flight_bytes"),
            "{refused}"
        );
        // Room comes back when the first body's request is answered.
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.take(512 * 1024, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(first);
        assert!(waiting.await.unwrap().unwrap().is_some());
    }
}
