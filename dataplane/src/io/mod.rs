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

use crate::packet::{Frame, Offload};
use std::os::fd::RawFd;
use thiserror::Error;

/// Frames per receive burst.
pub const BURST: usize = 64;

/// Bytes of frame a receive buffer holds after its headroom: a 1500-byte
/// MTU frame, VLAN tags, room to spare; larger frames are dropped and
/// counted (`IoStats::rx_oversize`).
pub const FRAME_ROOM: usize = 2048;

/// Bytes of frame a TAP port's receive buffer holds: the largest
/// super-frame (a 64 KiB IPv4 packet) inside VXLAN, with room to spare.
pub const SUPER_ROOM: usize = 65_664;

/// The largest underlay MTU a TAP uplink carries (the usual jumbo
/// ceiling): segments cut in software must fit [`SEGMENT_ROOM`].
pub const MAX_TAP_MTU: u16 = 9216;

/// Bytes of a segment cut from a super-frame in software: a frame of the
/// largest MTU meshplane forwards (a jumbo underlay's, [`MAX_TAP_MTU`]),
/// its Ethernet header and room to spare.
pub const SEGMENT_ROOM: usize = MAX_TAP_MTU as usize + 128;

/// What a port keeps count of itself (below the pipeline's counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Frames received.
    pub rx: u64,
    /// Frames transmitted.
    pub tx: u64,
    /// Frames not transmitted because the device or ring was full.
    pub tx_full: u64,
    /// Frames received larger than the port's receive buffers (dropped):
    /// [`FRAME_ROOM`], a TAP's [`SUPER_ROOM`], an AF_XDP chain's
    /// [`SEGMENT_ROOM`].
    pub rx_oversize: u64,
    /// Receive or transmit errors other than "full" (dropped frames).
    pub errors: u64,
    /// Frames received with a virtio-net header that does not fit them
    /// (bad GSO type, segment size 0, checksum offsets out of the frame,
    /// a super-frame that is not TCP over IPv4): dropped.
    pub rx_bad_offload: u64,
    /// Super-frames cut into segments in software for this port.
    pub tx_segmented: u64,
    /// Segments coalesced into super-frames for this port (GRO).
    pub tx_coalesced: u64,
    /// Frames the kernel dropped before the port could read them (AF_XDP:
    /// rx ring full, no fill buffer; `XDP_STATISTICS`).
    pub rx_kernel_dropped: u64,
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

    /// Receives up to [`BURST`] frames, each with room in front for the
    /// pipeline's encapsulation ([`crate::packet::HEADROOM`] bytes in the
    /// TAP and memory ports, 64 in an AF_XDP UMEM frame: VXLAN needs 50),
    /// and hands them to `f`; then sends the frames `f` marked out of this
    /// port again and releases the others. Returns the number of frames
    /// received (0: nothing was waiting; an AF_XDP port that took only the
    /// first buffers of a chained packet counts 1).
    fn rx_burst(&mut self, f: &mut BurstFn<'_>) -> usize;

    /// Transmits a copy of `frame`, a plain frame; false if the port had
    /// no room (counted in [`IoStats::tx_full`]).
    fn tx_copy(&mut self, frame: &[u8]) -> bool;

    /// Transmits a copy of the frame `f` with what it asks of its
    /// transmitter ([`Frame::offload`]): a port that takes super-frames
    /// passes them on; the others cut them into segments
    /// ([`tx_segments`]). False if not all of it went out.
    fn tx_frame(&mut self, f: &Frame<'_>) -> bool;

    /// Transmits copies of a run of frames, in order; a port that takes
    /// super-frames coalesces in-order TCP segments of one flow into one
    /// (GRO, `wire::gro`).
    fn tx_run(&mut self, frames: &[Frame<'_>]) {
        for f in frames {
            self.tx_frame(f);
        }
    }

    /// True if the last [`Port::rx_burst`] read until the device had
    /// nothing more, and the port's descriptor signals the next frame
    /// (an edge the worker's poll sees): the worker need not read it again
    /// until then (a TAP read that would block; an AF_XDP rx ring found
    /// empty, whose socket wakes its poll when the kernel adds to it).
    fn drained(&self) -> bool {
        false
    }

    /// Pushes out what was queued for transmission and reclaims what the
    /// device finished with (a no-op for ports that send at once).
    fn flush(&mut self);

    /// The file descriptor that becomes readable when frames arrive (for
    /// the idle wait).
    fn fd(&self) -> RawFd;

    /// The port's own counters.
    fn stats(&self) -> IoStats;
}

/// How a frame went out through [`tx_segments`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// A plain frame: sent (true) or not (the port had no room).
    Plain(bool),
    /// A super-frame cut into segments: all sent (true) or not.
    Segmented(bool),
    /// A super-frame whose headers do not allow cutting it: dropped.
    Unsegmentable,
}

impl IoStats {
    /// Counts how a frame went out; true if all of it did.
    pub fn count(&mut self, s: Sent) -> bool {
        match s {
            Sent::Plain(ok) => ok,
            Sent::Segmented(ok) => {
                self.tx_segmented += 1;
                ok
            }
            Sent::Unsegmentable => {
                self.errors += 1;
                false
            }
        }
    }
}

/// Sends the super-frame `f` as the segments it stands for, each through
/// `tx` (a port's plain transmit); a plain frame goes through `tx` as it
/// is.
pub fn tx_segments(f: &Frame<'_>, mut tx: impl FnMut(&[u8]) -> bool) -> Sent {
    let o = f.offload();
    if !o.is_super() {
        return Sent::Plain(tx(f.data()));
    }
    let d = f.data();
    let tcp = (o.csum_at as usize).wrapping_sub(f.start());
    let mut all = true;
    let sent = crate::wire::gso::Layout::of(d, tcp).and_then(|l| {
        // Segments of a 1500-byte underlay in a small buffer (the usual
        // case: no larger buffer to clear per super-frame); jumbo ones in
        // a buffer of SEGMENT_ROOM.
        let mut small = [0u8; FRAME_ROOM];
        let mut jumbo;
        let scratch: &mut [u8] = if l.headers(d) + usize::from(o.gso_size) <= FRAME_ROOM {
            &mut small
        } else {
            jumbo = [0u8; SEGMENT_ROOM];
            &mut jumbo
        };
        crate::wire::gso::segment(d, &l, o.gso_size, scratch, |s| all &= tx(s))
    });
    match sent {
        Ok(_) => Sent::Segmented(all),
        Err(_) => Sent::Unsegmentable,
    }
}

/// A receive buffer pool of [`BURST`] slots of `HEADROOM` and a frame room
/// each, for backends that copy frames in (TAP, memory).
#[derive(Debug)]
pub(crate) struct Slots {
    buf: Vec<u8>,
    lens: [usize; BURST],
    offloads: [Offload; BURST],
    slot: usize,
}

/// Bytes per slot of a port that receives plain frames only.
pub const SLOT: usize = crate::packet::HEADROOM + FRAME_ROOM;

impl Slots {
    /// Slots for frames of up to `room` bytes.
    pub(crate) fn new(room: usize) -> Self {
        let slot = crate::packet::HEADROOM + room;
        Slots { buf: vec![0; BURST * slot], lens: [0; BURST], offloads: [Offload::NONE; BURST], slot }
    }

    /// No slots (a placeholder while the real ones are lent out; allocates
    /// nothing).
    pub(crate) fn empty() -> Self {
        Slots { buf: Vec::new(), lens: [0; BURST], offloads: [Offload::NONE; BURST], slot: SLOT }
    }

    /// Slot `i` whole (headroom and frame room), to read a frame into at
    /// [`crate::packet::HEADROOM`].
    pub(crate) fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * self.slot..(i + 1) * self.slot]
    }

    /// The frame room of slot `i` (after its headroom), to read a frame into.
    pub(crate) fn room(&mut self, i: usize) -> &mut [u8] {
        &mut self.slot(i)[crate::packet::HEADROOM..]
    }

    /// Records that slot `i` holds a frame of `len` bytes asking `o` of
    /// its transmitter.
    pub(crate) fn set(&mut self, i: usize, len: usize, o: Offload) {
        self.lens[i] = len;
        self.offloads[i] = o;
    }

    /// Runs `f` over the first `n` slots as frames, then calls `back` with
    /// each frame `f` marked for sending back out (in order).
    pub(crate) fn lend(&mut self, n: usize, f: &mut BurstFn<'_>, mut back: impl FnMut(&Frame<'_>)) {
        let n = n.min(BURST);
        let mut marks = [false; BURST];
        let (lens, offloads, room) = (self.lens, self.offloads, self.slot - crate::packet::HEADROOM);
        let mut chunks = self.buf.chunks_exact_mut(self.slot);
        // Every slot is a frame (empty beyond `n`); `f` sees the first `n`.
        let mut frames: [Frame<'_>; BURST] = core::array::from_fn(|i| {
            let c = chunks.next().unwrap_or_default();
            let len = if i < n { lens[i].min(room) } else { 0 };
            let mut fr = Frame::new(c, crate::packet::HEADROOM.min(c.len()), len).unwrap_or_else(Frame::detached);
            if i < n {
                fr.set_offload(offloads[i]);
            }
            fr
        });
        f(&mut frames[..n], &mut marks);
        for (fr, m) in frames[..n].iter().zip(marks) {
            if m {
                back(fr);
            }
        }
    }
}
