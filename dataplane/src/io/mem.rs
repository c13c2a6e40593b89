//! An in-memory port: frames queued in and collected out. For unit tests
//! of the worker only; real ports are TAP and AF_XDP.

use super::{BurstFn, IoStats, Port, Slots};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The two queues of a [`MemPort`], shared with the test that drives it.
#[derive(Debug, Default)]
pub struct MemQueues {
    /// Frames waiting to be received.
    pub rx: VecDeque<Vec<u8>>,
    /// Frames the port transmitted, in order.
    pub tx: Vec<Vec<u8>>,
}

/// A port over [`MemQueues`].
#[derive(Debug)]
pub struct MemPort {
    name: String,
    queues: Arc<Mutex<MemQueues>>,
    slots: Slots,
    stats: IoStats,
    /// Transmit room: frames beyond it are refused (to test "full").
    pub tx_room: usize,
}

impl MemPort {
    /// A port named `name`, and the handle to its queues.
    pub fn new(name: &str) -> (MemPort, Arc<Mutex<MemQueues>>) {
        let q = Arc::new(Mutex::new(MemQueues::default()));
        let p = MemPort {
            name: name.to_owned(),
            queues: q.clone(),
            slots: Slots::new(super::FRAME_ROOM),
            stats: IoStats::default(),
            tx_room: usize::MAX,
        };
        (p, q)
    }

    fn queues(&self) -> MutexGuard<'_, MemQueues> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Port for MemPort {
    fn name(&self) -> &str {
        &self.name
    }

    fn rx_burst(&mut self, f: &mut BurstFn<'_>) -> usize {
        let mut n = 0;
        {
            let q = self.queues.clone();
            let mut q = q.lock().unwrap_or_else(PoisonError::into_inner);
            while n < super::BURST {
                let Some(fr) = q.rx.pop_front() else { break };
                if fr.len() > super::FRAME_ROOM {
                    self.stats.rx_oversize += 1;
                    continue;
                }
                self.slots.room(n)[..fr.len()].copy_from_slice(&fr);
                self.slots.set(n, fr.len(), crate::packet::Offload::NONE);
                n += 1;
            }
        }
        self.stats.rx += n as u64;
        let mut out = Vec::new();
        self.slots.lend(n, f, |d| out.push(d.data().to_vec()));
        for d in out {
            self.tx_copy(&d);
        }
        n
    }

    fn tx_copy(&mut self, frame: &[u8]) -> bool {
        let room = self.tx_room;
        let mut q = self.queues();
        if q.tx.len() >= room {
            drop(q);
            self.stats.tx_full += 1;
            return false;
        }
        q.tx.push(frame.to_vec());
        drop(q);
        self.stats.tx += 1;
        true
    }

    fn tx_frame(&mut self, f: &crate::packet::Frame<'_>) -> bool {
        let sent = super::tx_segments(f, |d| self.tx_copy(d));
        self.stats.count(sent)
    }

    fn flush(&mut self) {}

    fn fd(&self) -> RawFd {
        -1
    }

    fn stats(&self) -> IoStats {
        self.stats
    }
}
