//! Classic pcap files (as `tcpdump -w` writes them), Ethernet link type only:
//! a reader for captures and a writer for what the pipeline would send.
//! Not on the packet path.

use std::io::{self, Read, Write};
use thiserror::Error;

/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;
const MAGIC_US: u32 = 0xa1b2_c3d4;
const MAGIC_NS: u32 = 0xa1b2_3c4d;
/// Largest record the reader accepts (a jumbo frame with room to spare).
pub const MAX_RECORD: u32 = 256 * 1024;

/// Errors reading or writing a capture.
#[derive(Debug, Error)]
pub enum PcapError {
    /// The file does not start with a pcap magic number (pcapng is not read).
    #[error("not a classic pcap file (magic {0:#010x}); convert pcapng with `editcap -F pcap IN OUT`")]
    BadMagic(u32),
    /// A link type other than Ethernet.
    #[error("link type {0} is not Ethernet (1); capture on an Ethernet interface, not `-i any`")]
    LinkType(u32),
    /// A record longer than [`MAX_RECORD`] or than the snapshot length.
    #[error("record {index}: captured length {len} is not plausible")]
    BadRecord {
        /// Record number, from 0.
        index: usize,
        /// The length found.
        len: u32,
    },
    /// The file ends inside a header or a record.
    #[error("file ends inside record {0}")]
    Truncated(usize),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Capture time: seconds.
    pub ts_sec: u32,
    /// Capture time: nanoseconds.
    pub ts_nsec: u32,
    /// Length on the wire (may exceed `data.len()` if the capture was cut).
    pub orig_len: u32,
    /// The captured bytes.
    pub data: Vec<u8>,
}

/// Reads a whole capture.
pub fn read(mut r: impl Read) -> Result<Vec<Record>, PcapError> {
    let mut hdr = [0u8; 24];
    r.read_exact(&mut hdr).map_err(|e| eof_as(e, 0))?;
    let magic_le = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let (le, nanos) = match (magic_le, magic_le.swap_bytes()) {
        (MAGIC_US, _) => (true, false),
        (MAGIC_NS, _) => (true, true),
        (_, MAGIC_US) => (false, false),
        (_, MAGIC_NS) => (false, true),
        _ => return Err(PcapError::BadMagic(magic_le)),
    };
    let u32_at = |b: &[u8], o: usize| {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    };
    let link = u32_at(&hdr, 20) & 0x0fff_ffff;
    if link != LINKTYPE_ETHERNET {
        return Err(PcapError::LinkType(link));
    }
    let mut out = Vec::new();
    loop {
        let index = out.len();
        let mut rh = [0u8; 16];
        match r.read(&mut rh[..1])? {
            0 => return Ok(out),
            _ => r.read_exact(&mut rh[1..]).map_err(|e| eof_as(e, index))?,
        }
        let len = u32_at(&rh, 8);
        if len > MAX_RECORD {
            return Err(PcapError::BadRecord { index, len });
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).map_err(|e| eof_as(e, index))?;
        let sub = u32_at(&rh, 4);
        out.push(Record {
            ts_sec: u32_at(&rh, 0),
            ts_nsec: if nanos { sub } else { sub.saturating_mul(1000) },
            orig_len: u32_at(&rh, 12),
            data,
        });
    }
}

fn eof_as(e: io::Error, index: usize) -> PcapError {
    if e.kind() == io::ErrorKind::UnexpectedEof { PcapError::Truncated(index) } else { PcapError::Io(e) }
}

/// Writes a capture: nanosecond-resolution little-endian pcap, Ethernet.
pub struct Writer<W: Write> {
    w: W,
}

impl<W: Write> Writer<W> {
    /// Writes the file header.
    pub fn new(mut w: W) -> io::Result<Self> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&MAGIC_NS.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&MAX_RECORD.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        w.write_all(&h)?;
        Ok(Writer { w })
    }
    /// Appends one frame.
    pub fn write(&mut self, ts_sec: u32, ts_nsec: u32, frame: &[u8]) -> io::Result<()> {
        let len = u32::try_from(frame.len()).map_err(|_| io::Error::other("frame too large for pcap"))?;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ts_sec.to_le_bytes());
        h[4..8].copy_from_slice(&ts_nsec.to_le_bytes());
        h[8..12].copy_from_slice(&len.to_le_bytes());
        h[12..16].copy_from_slice(&len.to_le_bytes());
        self.w.write_all(&h)?;
        self.w.write_all(frame)
    }
    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read() {
        let mut w = Writer::new(Vec::new()).unwrap();
        w.write(1, 500, &[1, 2, 3]).unwrap();
        w.write(2, 0, &[]).unwrap();
        let bytes = w.finish().unwrap();
        let recs = read(&bytes[..]).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0], Record { ts_sec: 1, ts_nsec: 500, orig_len: 3, data: vec![1, 2, 3] });
        assert!(recs[1].data.is_empty());
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(matches!(read(&[0u8; 24][..]), Err(PcapError::BadMagic(0))));
        assert!(matches!(read(&[0u8; 3][..]), Err(PcapError::Truncated(0))));
        let mut w = Writer::new(Vec::new()).unwrap();
        w.write(1, 0, &[1, 2, 3, 4]).unwrap();
        let bytes = w.finish().unwrap();
        assert!(matches!(read(&bytes[..bytes.len() - 1]), Err(PcapError::Truncated(0))));
        let mut sll = bytes.clone();
        sll[20] = 113;
        assert!(matches!(read(&sll[..]), Err(PcapError::LinkType(113))));
        let mut huge = bytes.clone();
        huge[32..36].copy_from_slice(&(MAX_RECORD + 1).to_le_bytes());
        assert!(matches!(read(&huge[..]), Err(PcapError::BadRecord { index: 0, .. })));
    }
}
