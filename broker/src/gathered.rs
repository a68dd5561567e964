//! Work gathered for one worker at a time: while a worker runs, what arrives waits and is
//! taken as one batch by its next round, so a burst (a fleet disconnecting or reporting at
//! once) costs a few batches instead of a task or a transaction per item.

use std::sync::Mutex;

/// Items waiting, and whether a worker is taking them.
pub struct Gathered<T> {
    inner: Mutex<(Vec<T>, bool)>,
}

impl<T> Default for Gathered<T> {
    fn default() -> Self {
        Gathered {
            inner: Mutex::new((Vec::new(), false)),
        }
    }
}

impl<T> Gathered<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<T>, bool)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an item; true when no worker is running and the caller must start one.
    pub fn push(&self, item: T) -> bool {
        let mut g = self.lock();
        g.0.push(item);
        !std::mem::replace(&mut g.1, true)
    }

    /// The worker's next batch; `None` when nothing waits, and the worker is done.
    pub fn take(&self) -> Option<Vec<T>> {
        let mut g = self.lock();
        if g.0.is_empty() {
            g.1 = false;
            return None;
        }
        Some(std::mem::take(&mut g.0))
    }

    /// The worker gave up: the next push starts another.
    pub fn stop(&self) {
        self.lock().1 = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_takes_everything_gathered_meanwhile() {
        let g = Gathered::default();
        assert!(g.push(1), "the first item starts a worker");
        assert!(!g.push(2) && !g.push(3), "one is running");
        assert_eq!(g.take(), Some(vec![1, 2, 3]));
        assert!(!g.push(4), "still running until it finds nothing");
        assert_eq!(g.take(), Some(vec![4]));
        assert_eq!(g.take(), None);
        assert!(g.push(5), "it finished: the next item starts another");
        g.stop();
        assert!(g.push(6), "it gave up: the next item starts another");
    }
}
