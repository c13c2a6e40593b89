//! Ports: where frames come from and go to.
//!
//! A [`Port`] receives frames in bursts of up to [`BURST`] and lends them,
//! in place, to the worker, which runs the pipeline over them; frames the
//! pipeline sends back out of the same port go without a copy where the
//! backend allows (an AF_XDP descriptor moves from the rx ring to the tx
//! ring); frames for another port are copied into that port's buffers
//! ([`Port::tx_copy`]). Backends: [`tap`] (a TAP device: one `read`/`write`
//! per frame), `afxdp` (AF_XDP sockets) and [`mem`] (in-memory queues, for
//! unit tests only).

pub mod afxdp;
pub mod mem;
pub mod tap;

use crate::packet::Frame;
use std::os::fd::RawFd;
use thiserror::Error;

/// Frames per receive burst.
pub const BURST: usize = 64;

/// Bytes of frame a receive buffer holds after its headroom: a 1500-byte
/// MTU frame, VLAN tags, room to spare; larger frames are dropped and
/// counted (`IoStats::rx_oversize`).
pub const FRAME_ROOM: usize = 2048;

/// What a port keeps count of itself (below the pipeline's counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Frames received.
    pub rx: u64,
    /// Frames transmitted.
    pub tx: u64,
    /// Frames not transmitted because the device or ring was full.
    pub tx_full: u64,
    /// Frames received larger than [`FRAME_ROOM`] (dropped).
    pub rx_oversize: u64,
    /// Receive or transmit errors other than "full" (dropped frames).
    pub errors: u64,
}

/// An I/O error of a port, with what it was doing.
#[derive(Debug, Error)]
pub enum IoError {
    /// Opening or configuring the port failed.
    #[error("port {port}: {what}: {source}")]
    Setup {
        /// The port's name.
        port: String,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The port cannot work as configured.
    #[error("port {port}: {msg}")]
    Config {
        /// The port's name.
        port: String,
        /// What is wrong.
        msg: String,
    },
}

/// The frames of one received burst, in place, and what the worker decided:
/// `back[i]` set means "send frame `i` out of this same port as it is now".
pub type BurstFn<'f> = dyn FnMut(&mut [Frame<'_>], &mut [bool; BURST]) + 'f;

/// A source and sink of Ethernet frames.
pub trait Port: Send {
    /// The port's name (its interface's).
    fn name(&self) -> &str;

    /// Receives up to [`BURST`] frames, each with [`crate::packet::HEADROOM`]
    /// bytes of headroom, and hands them to `f`; then sends the frames `f`
    /// marked out of this port again and releases the others. Returns the
    /// number of frames received (0: nothing was waiting).
    fn rx_burst(&mut self, f: &mut BurstFn<'_>) -> usize;

    /// Transmits a copy of `frame`; false if the port had no room (counted
    /// in [`IoStats::tx_full`]).
    fn tx_copy(&mut self, frame: &[u8]) -> bool;

    /// Pushes out what was queued for transmission and reclaims what the
    /// device finished with (a no-op for ports that send at once).
    fn flush(&mut self);

    /// The file descriptor that becomes readable when frames arrive (for
    /// the idle wait).
    fn fd(&self) -> RawFd;

    /// The port's own counters.
    fn stats(&self) -> IoStats;
}

/// A receive buffer pool of [`BURST`] slots of `HEADROOM + FRAME_ROOM` bytes,
/// for backends that copy frames in (TAP, memory).
#[derive(Debug)]
pub(crate) struct Slots {
    buf: Vec<u8>,
    lens: [usize; BURST],
}

/// Bytes per slot.
pub const SLOT: usize = crate::packet::HEADROOM + FRAME_ROOM;

impl Slots {
    pub(crate) fn new() -> Self {
        Slots { buf: vec![0; BURST * SLOT], lens: [0; BURST] }
    }

    /// No slots (a placeholder while the real ones are lent out; allocates
    /// nothing).
    pub(crate) fn empty() -> Self {
        Slots { buf: Vec::new(), lens: [0; BURST] }
    }

    /// The frame room of slot `i` (after its headroom), to read a frame into.
    pub(crate) fn room(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * SLOT + crate::packet::HEADROOM..(i + 1) * SLOT]
    }

    /// Records that slot `i` holds a frame of `len` bytes.
    pub(crate) fn set_len(&mut self, i: usize, len: usize) {
        self.lens[i] = len;
    }

    /// Runs `f` over the first `n` slots as frames, then calls `back` with
    /// each frame `f` marked for sending back out (in order).
    pub(crate) fn lend(&mut self, n: usize, f: &mut BurstFn<'_>, mut back: impl FnMut(&[u8])) {
        let n = n.min(BURST);
        let mut marks = [false; BURST];
        let lens = self.lens;
        let mut chunks = self.buf.chunks_exact_mut(SLOT);
        // Every slot is a frame (empty beyond `n`); `f` sees the first `n`.
        let mut frames: [Frame<'_>; BURST] = core::array::from_fn(|i| {
            let c = chunks.next().unwrap_or_default();
            let len = if i < n { lens[i].min(FRAME_ROOM) } else { 0 };
            Frame::new(c, crate::packet::HEADROOM.min(c.len()), len).unwrap_or_else(Frame::detached)
        });
        f(&mut frames[..n], &mut marks);
        for (fr, m) in frames[..n].iter().zip(marks) {
            if m {
                back(fr.data());
            }
        }
    }
}
