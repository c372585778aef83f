//! The daemon-wide budget of bytes held in client messages not yet handled.
//!
//! Every connection may buffer [`super::FREE_BUFFER_BYTES`] of input on its
//! own: messages that fit there (nearly all) never touch this budget.
//! Beyond that, a connection needs a [`Reservation`] for the rest of its
//! buffer, and holds it until the message has been handled (decoded,
//! validated, handed to the spool). A reservation comes from one of two
//! places:
//!
//! * the **pool**, shared by all connections (`pool_bytes`): many
//!   medium-sized messages at once;
//! * the **whole-message slot**, held by one connection at a time, which
//!   covers a message at the limit (`slot_bytes`).
//!
//! A connection that cannot get what it needs waits, and is not read
//! meanwhile: its client's writes block (back-pressure, nothing is lost).
//! A connection waiting may hold part of the pool (a JSON line grows
//! step by step), but whoever holds the slot has all it can need and never
//! waits for the pool, so the slot is always given back (once its message
//! is whole, or once its client is timed out) and waiting always ends.
//!
//! Invariant: the bytes of all buffers beyond the free share never exceed
//! `pool_bytes + slot_bytes`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// The shared budget (one per daemon).
pub struct MessageBudget {
    pool: Arc<Semaphore>,
    pool_bytes: usize,
    slot: Arc<Semaphore>,
    slot_bytes: usize,
}

impl MessageBudget {
    /// A budget of `pool_bytes` shared, plus one slot of `slot_bytes`.
    /// Both are at most `u32::MAX` (permits are counted in bytes).
    pub fn new(pool_bytes: usize, slot_bytes: usize) -> Arc<Self> {
        let cap = u32::MAX as usize;
        Arc::new(MessageBudget {
            pool: Arc::new(Semaphore::new(pool_bytes.min(cap))),
            pool_bytes: pool_bytes.min(cap),
            slot: Arc::new(Semaphore::new(1)),
            slot_bytes: slot_bytes.min(cap),
        })
    }

    /// Bytes of the pool not reserved now.
    pub fn pool_available(&self) -> usize {
        self.pool.available_permits()
    }

    /// Whether nothing is reserved now.
    pub fn is_idle(&self) -> bool {
        self.pool_available() == self.pool_bytes && self.slot_available()
    }

    /// Whether the whole-message slot is free now.
    pub fn slot_available(&self) -> bool {
        self.slot.available_permits() == 1
    }
}

/// What one connection holds of the budget.
pub struct Reservation {
    budget: Arc<MessageBudget>,
    pool: Option<OwnedSemaphorePermit>,
    slot: Option<OwnedSemaphorePermit>,
}

impl Reservation {
    /// Holds nothing yet.
    pub fn new(budget: Arc<MessageBudget>) -> Self {
        Reservation {
            budget,
            pool: None,
            slot: None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        if self.slot.is_some() {
            self.budget.slot_bytes
        } else {
            self.pool.as_ref().map_or(0, |p| p.num_permits())
        }
    }

    /// Grows to at least `bytes` if that is possible without waiting.
    pub fn try_grow(&mut self, bytes: usize) -> bool {
        let held = self.bytes();
        if bytes <= held {
            return true;
        }
        if bytes > self.budget.pool_bytes {
            return match self.budget.slot.clone().try_acquire_owned() {
                Ok(s) => {
                    self.take_slot(s);
                    true
                }
                Err(_) => false,
            };
        }
        match self
            .budget
            .pool
            .clone()
            .try_acquire_many_owned((bytes - held) as u32)
        {
            Ok(p) => {
                self.add_pool(p);
                true
            }
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => false,
        }
    }

    /// Grows to at least `bytes` (at most the slot's size), waiting for
    /// the pool or the whole-message slot, whichever comes first.
    /// Cancel-safe: dropped before it completes, it holds what it held.
    pub async fn grow(&mut self, bytes: usize) {
        let held = self.bytes();
        if bytes <= held {
            return;
        }
        let pool = self.budget.pool.clone();
        let slot = self.budget.slot.clone();
        let from_pool = bytes <= self.budget.pool_bytes;
        tokio::select! {
            biased;
            s = slot.acquire_owned() => {
                if let Ok(s) = s {
                    self.take_slot(s);
                }
            }
            p = pool.acquire_many_owned((bytes - held) as u32), if from_pool => {
                if let Ok(p) = p {
                    self.add_pool(p);
                }
            }
        }
    }

    /// Gives back what is held beyond `bytes`. The slot is kept while any
    /// of it is needed, and given back when nothing is.
    pub fn shrink(&mut self, bytes: usize) {
        if self.slot.is_some() {
            if bytes == 0 {
                self.slot = None;
            } else if bytes <= self.budget.pool_bytes {
                // Trade the slot for a share of the pool when one is free,
                // so the next large message does not wait for this one.
                if let Ok(p) = self
                    .budget
                    .pool
                    .clone()
                    .try_acquire_many_owned(bytes as u32)
                {
                    self.slot = None;
                    self.pool = Some(p);
                }
            }
            return;
        }
        if let Some(p) = self.pool.as_mut() {
            let held = p.num_permits();
            if bytes == 0 {
                self.pool = None;
            } else if held > bytes {
                drop(p.split(held - bytes));
            }
        }
    }

    fn add_pool(&mut self, p: OwnedSemaphorePermit) {
        match self.pool.as_mut() {
            Some(held) => held.merge(p),
            None => self.pool = Some(p),
        }
    }

    /// The slot covers a whole message: what was held of the pool goes back.
    fn take_slot(&mut self, s: OwnedSemaphorePermit) {
        self.slot = Some(s);
        self.pool = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_pool_and_the_slot_are_shared_and_given_back() {
        let b = MessageBudget::new(100, 1000);
        let mut one = Reservation::new(b.clone());
        let mut two = Reservation::new(b.clone());
        assert!(one.try_grow(60));
        assert_eq!(one.bytes(), 60);
        assert!(!two.try_grow(60), "40 left in the pool");
        assert!(two.try_grow(40));
        // Beyond the pool: the slot.
        assert!(one.try_grow(500));
        assert_eq!(one.bytes(), 1000);
        assert_eq!(b.pool_available(), 60, "the slot replaced one's share");
        assert!(!two.try_grow(500), "one slot only");
        one.shrink(0);
        assert!(b.slot_available());
        two.shrink(10);
        assert_eq!(two.bytes(), 10);
        assert_eq!(b.pool_available(), 90);
        drop(two);
        assert_eq!(b.pool_available(), 100);
    }

    #[tokio::test]
    async fn connections_holding_parts_of_the_pool_and_waiting_for_more_all_get_through() {
        // Three JSON lines have each taken part of the pool and all want
        // more than is left: without the slot, none would ever get it.
        let b = MessageBudget::new(90, 1000);
        let mut held: Vec<_> = (0..3).map(|_| Reservation::new(b.clone())).collect();
        for r in held.iter_mut() {
            assert!(r.try_grow(30));
        }
        for r in held.iter_mut() {
            assert!(!r.try_grow(60));
        }
        let mut waiting: Vec<_> = held
            .into_iter()
            .map(|mut r| {
                tokio::spawn(async move {
                    r.grow(60).await;
                    r
                })
            })
            .collect();
        // Each one that gets through finishes its message and gives back
        // what it holds, as a connection does once its message is handled.
        let mut done = 0;
        while !waiting.is_empty() {
            let (r, _, rest) = tokio::time::timeout(
                Duration::from_secs(1),
                futures_util::future::select_all(waiting),
            )
            .await
            .expect("one of them always gets through");
            let mut r = r.unwrap();
            assert!(r.bytes() >= 60);
            r.shrink(0);
            done += 1;
            waiting = rest;
        }
        assert_eq!(done, 3);
        assert_eq!(b.pool_available(), 90);
        assert!(b.slot_available());
    }

    #[test]
    fn a_slot_no_longer_needed_is_traded_for_a_share_of_the_pool() {
        let b = MessageBudget::new(100, 1000);
        let mut one = Reservation::new(b.clone());
        assert!(one.try_grow(500));
        one.shrink(30);
        assert!(b.slot_available());
        assert_eq!(one.bytes(), 30);
    }
}
