//! A TAP device as a port (tokio-tun creates or attaches it; its file
//! descriptor is read and written directly, non-blocking, one frame per
//! system call). For task ports, and as the uplink where AF_XDP is not
//! available. The TAP interface can be moved into another network
//! namespace after it is opened (a task's): the file descriptor keeps
//! working.

use super::{BurstFn, IoError, IoStats, Port, Slots};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;
use tokio_tun::Tun;

/// A TAP port.
pub struct TapPort {
    tun: Tun,
    name: String,
    slots: Slots,
    stats: IoStats,
}

impl std::fmt::Debug for TapPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapPort").field("name", &self.name).field("stats", &self.stats).finish()
    }
}

/// tokio-tun registers each device with a tokio reactor; this one is never
/// driven (the ports are polled by the worker), it only has to exist.
fn runtime() -> Result<&'static tokio::runtime::Runtime, std::io::Error> {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    Ok(RT.get_or_init(|| rt))
}

impl TapPort {
    /// Creates the TAP device `name` (or attaches to a persistent one of
    /// that name), without packet information, and sets it up.
    pub fn open(name: &str) -> Result<TapPort, IoError> {
        let mut v = Self::open_queues(name, 1)?;
        v.pop().ok_or_else(|| IoError::Config { port: name.to_owned(), msg: "no TAP queue was created".into() })
    }

    /// Opens `queues` queues of the TAP device `name` (one per worker; more
    /// than one makes it a multi-queue device, and a persistent one must
    /// have been created `multi_queue`).
    pub fn open_queues(name: &str, queues: usize) -> Result<Vec<TapPort>, IoError> {
        let setup =
            |what: &'static str| move |source: std::io::Error| IoError::Setup { port: name.to_owned(), what, source };
        if name.is_empty() || name.len() > 15 {
            return Err(IoError::Config { port: name.to_owned(), msg: "a TAP name has 1 to 15 bytes".into() });
        }
        let rt = runtime().map_err(setup("starting the TAP reactor"))?;
        let _guard = rt.enter();
        let mut b = Tun::builder().name(name).tap().up();
        if queues > 1 {
            b = b.queues(queues);
        }
        let tuns = b.build().map_err(|e| IoError::Setup {
            port: name.to_owned(),
            what: "creating the TAP device",
            source: std::io::Error::other(e.to_string()),
        })?;
        if tuns.len() != queues {
            return Err(IoError::Config {
                port: name.to_owned(),
                msg: format!("{} TAP queues for {queues}", tuns.len()),
            });
        }
        Ok(tuns
            .into_iter()
            .map(|tun| TapPort { name: tun.name().to_owned(), tun, slots: Slots::new(), stats: IoStats::default() })
            .collect())
    }

    fn send(&mut self, frame: &[u8]) -> bool {
        match self.tun.try_send(frame) {
            Ok(_) => {
                self.stats.tx += 1;
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.stats.tx_full += 1;
                false
            }
            // EIO while the interface is down (not yet configured in its
            // namespace): dropped, counted.
            Err(_) => {
                self.stats.errors += 1;
                false
            }
        }
    }
}

impl Port for TapPort {
    fn name(&self) -> &str {
        &self.name
    }

    fn rx_burst(&mut self, f: &mut BurstFn<'_>) -> usize {
        let mut n = 0;
        while n < super::BURST {
            let room = self.slots.room(n);
            let cap = room.len();
            match self.tun.try_recv(room) {
                // A frame that filled the room may have been cut short.
                Ok(len) if len >= cap => self.stats.rx_oversize += 1,
                Ok(len) => {
                    self.slots.set_len(n, len);
                    n += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.stats.errors += 1;
                    break;
                }
            }
        }
        if n == 0 {
            return 0;
        }
        self.stats.rx += n as u64;
        let mut slots = std::mem::replace(&mut self.slots, Slots::empty());
        slots.lend(n, f, |d| {
            self.send(d);
        });
        self.slots = slots;
        n
    }

    fn tx_copy(&mut self, frame: &[u8]) -> bool {
        self.send(frame)
    }

    fn flush(&mut self) {}

    fn fd(&self) -> RawFd {
        self.tun.as_raw_fd()
    }

    fn stats(&self) -> IoStats {
        self.stats
    }
}
