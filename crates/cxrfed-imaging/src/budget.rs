//! A byte budget shared by every decode in a process.
//!
//! `decode_workers` bounds how many images decode at once, but not how much memory they take:
//! eight 8192×8192 images at once need gigabytes. Each decode reserves its estimated peak
//! (file plus decoded frames, from the checked header) before any pixel decoding; a decode
//! that alone exceeds the budget is refused, one that fits waits until enough is free, and
//! gives up with [`ImagingError::ResourceLimit`] after the budget's wait.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::ImagingError;

#[derive(Debug)]
struct Shared {
    in_use: Mutex<u64>,
    freed: Condvar,
}

/// A process-wide decode memory budget (a cheap handle; clones share it).
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    shared: Arc<Shared>,
    total: u64,
    wait: Duration,
}

/// Bytes held from a [`MemoryBudget`] until dropped.
#[derive(Debug)]
pub struct Reservation {
    shared: Arc<Shared>,
    bytes: u64,
}

impl MemoryBudget {
    /// A budget of `total` bytes; a reservation waits at most `wait` for room.
    pub fn new(total: u64, wait: Duration) -> Self {
        MemoryBudget {
            shared: Arc::new(Shared {
                in_use: Mutex::new(0),
                freed: Condvar::new(),
            }),
            total,
            wait,
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes reserved right now.
    pub fn in_use(&self) -> u64 {
        *self.shared.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `bytes` for `what`, blocking (this runs on the blocking pool) until they fit.
    pub fn reserve(&self, bytes: u64, what: &str) -> Result<Reservation, ImagingError> {
        if bytes > self.total {
            return Err(ImagingError::ResourceLimit(format!(
                "{what} needs about {} MiB to decode, above the node's decode memory budget of {} MiB (decode_memory_bytes)",
                bytes.div_ceil(1 << 20),
                self.total >> 20
            )));
        }
        let deadline = Instant::now() + self.wait;
        // A poisoned lock only means another decode panicked while holding it; the counter
        // itself is always consistent (it is updated in one statement).
        let mut in_use = self.shared.in_use.lock().unwrap_or_else(|p| p.into_inner());
        while *in_use + bytes > self.total {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ImagingError::DecodeBudgetBusy(format!(
                    "the node's decode memory budget ({} MiB) stayed busy for {} s; retry later",
                    self.total >> 20,
                    self.wait.as_secs()
                )));
            }
            in_use = self
                .shared
                .freed
                .wait_timeout(in_use, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *in_use += bytes;
        Ok(Reservation {
            shared: self.shared.clone(),
            bytes,
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut in_use = self.shared.in_use.lock().unwrap_or_else(|p| p.into_inner());
        *in_use -= self.bytes;
        self.shared.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_large_is_refused_and_full_waits_then_times_out() {
        let budget = MemoryBudget::new(100, Duration::from_millis(50));
        assert!(matches!(
            budget.reserve(101, "x"),
            Err(ImagingError::ResourceLimit(_))
        ));
        let held = budget.reserve(80, "a").expect("fits");
        assert_eq!(budget.in_use(), 80);
        let err = budget.reserve(30, "b").expect_err("busy");
        assert!(err.to_string().contains("stayed busy"), "{err}");
        assert!(err.is_transient() && matches!(err, ImagingError::DecodeBudgetBusy(_)));
        drop(held);
        assert_eq!(budget.in_use(), 0);
        budget.reserve(100, "c").expect("free again");
    }

    #[test]
    fn a_waiter_proceeds_when_memory_is_freed() {
        let budget = MemoryBudget::new(100, Duration::from_secs(30));
        let held = budget.reserve(90, "a").expect("fits");
        let other = budget.clone();
        let waiter = std::thread::spawn(move || other.reserve(50, "b").map(|r| r.bytes));
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        assert_eq!(waiter.join().expect("thread").expect("reserved"), 50);
    }
}
