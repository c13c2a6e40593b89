//! Forwarding the names that are not the cluster's (`docs/dns-design.md`
//! section 6): to at most three upstreams, from the node's own
//! `/etc/resolv.conf` (read again when it changes) or `--dns-upstream`;
//! from the node's kernel, directly. Per query and upstream a fresh
//! connected socket (a kernel-random source port) and a new random ID
//! (RFC 5452); a reply is taken only from that socket, with that ID and
//! the same question, and the task's ID is put back. 2 s per upstream,
//! the next one on a timeout, SERVFAIL or REFUSED; 4 s in all.

use super::{Counters, Limits, bump};
use hickory_proto::op::{Header, MessageType, Query};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use meshplane_dns::wire::Request;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// glibc's `MAXNS` and Swarm's `maxExtDNS`.
const MAX_UPSTREAMS: usize = 3;
/// How often resolv.conf's mtime is looked at.
const RECHECK: Duration = Duration::from_secs(5);

/// Where the upstreams come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Upstreams {
    /// `--dns-upstream` (at most three are used).
    Fixed(Vec<SocketAddr>),
    /// The `nameserver` lines of a resolv.conf (the node's
    /// `/etc/resolv.conf`), read again when its mtime changes.
    ResolvConf(PathBuf),
}

/// `IP` or `IP:PORT` (`--dns-upstream`; port 53 unless given).
pub(crate) fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("--dns-upstream {s:?}: expected IP or IP:PORT"))
}

/// The first three `nameserver` addresses of a resolv.conf's text (a
/// scope suffix, `%eth0`, is left off).
pub(crate) fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(MAX_UPSTREAMS)
        .collect()
}

/// The `search` line of a resolv.conf's text (its domains), if any.
pub(crate) fn search(text: &str) -> Option<String> {
    text.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("search")?;
        (rest.starts_with(char::is_whitespace) && !rest.trim().is_empty()).then(|| rest.trim().to_owned())
    })
}

/// What the forwarder knows of its upstreams.
#[derive(Default)]
struct Known {
    list: Vec<SocketAddr>,
    mtime: Option<SystemTime>,
    checked: Option<Instant>,
    gateways: Vec<Ipv4Addr>,
    warned: Vec<SocketAddr>,
    warned_none: bool,
}

/// The forwarder.
pub(super) struct Forwarder {
    source: Upstreams,
    never: Vec<Ipv4Addr>,
    limits: Limits,
    known: Mutex<Known>,
}

impl Forwarder {
    pub(super) fn new(source: Upstreams, never: Vec<Ipv4Addr>, limits: Limits) -> Forwarder {
        Forwarder { source, never, limits, known: Mutex::new(Known::default()) }
    }

    /// The cluster networks' gateways (they would loop: never upstreams).
    pub(super) fn set_gateways(&self, g: Vec<Ipv4Addr>) {
        self.known.lock().unwrap_or_else(PoisonError::into_inner).gateways = g;
    }

    /// The upstreams to try now, those that would loop left out (with a
    /// warning, once each).
    fn upstreams(&self) -> Vec<SocketAddr> {
        let mut k = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        match &self.source {
            Upstreams::Fixed(v) => k.list = v.iter().copied().take(MAX_UPSTREAMS).collect(),
            Upstreams::ResolvConf(path) => {
                if k.checked.is_none_or(|t| t.elapsed() >= RECHECK) {
                    k.checked = Some(Instant::now());
                    reread(path, &mut k);
                }
            }
        }
        let loops = |a: &SocketAddr| match a.ip() {
            IpAddr::V4(ip) => ip.is_unspecified() || self.never.contains(&ip) || k.gateways.contains(&ip),
            IpAddr::V6(ip) => ip.is_unspecified(),
        };
        let (bad, good): (Vec<SocketAddr>, Vec<SocketAddr>) = k.list.iter().partition(|a| loops(a));
        for b in bad {
            if !k.warned.contains(&b) {
                k.warned.push(b);
                tracing::warn!("DNS upstream {b} would loop back to this node's own DNS: left out");
            }
        }
        if good.is_empty() && !k.warned_none {
            k.warned_none = true;
            tracing::warn!("DNS: no upstream (resolv.conf or --dns-upstream): names outside the cluster get SERVFAIL");
        }
        good
    }

    /// `raw` (the task's query, parsed as `req`) forwarded: the first
    /// upstream's answer that is not SERVFAIL or REFUSED, with the task's
    /// ID; `None` (SERVFAIL to send) if none answered in time.
    pub(super) async fn forward(&self, raw: &[u8], req: &Request, tcp: bool, c: &Counters) -> Option<Vec<u8>> {
        let list = self.upstreams();
        if list.is_empty() {
            bump(&c.forward_errors);
            return None;
        }
        bump(&c.forwarded);
        let start = Instant::now();
        let tries = async {
            for up in list {
                let left = self.limits.total.saturating_sub(start.elapsed());
                if left.is_zero() {
                    break;
                }
                let once = async { if tcp { ask_tcp(up, raw, req).await } else { ask_udp(up, raw, req).await } };
                match tokio::time::timeout(self.limits.per_try.min(left), once).await {
                    Err(_) => bump(&c.forward_timeouts),
                    Ok(Err(e)) => {
                        bump(&c.forward_errors);
                        tracing::debug!("DNS upstream {up}: {e}");
                    }
                    Ok(Ok(reply)) if matches!(reply.get(3).map(|r| r & 0x0f), Some(2 | 5)) => {
                        bump(&c.forward_errors);
                    }
                    Ok(Ok(reply)) => return Some(reply),
                }
            }
            None
        };
        tokio::time::timeout(self.limits.total, tries).await.ok().flatten()
    }
}

/// Reads `path` again if its mtime changed.
fn reread(path: &Path, k: &mut Known) {
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if mtime.is_some() && mtime == k.mtime {
        return;
    }
    k.mtime = mtime;
    let list = std::fs::read_to_string(path).map(|t| nameservers(&t)).unwrap_or_default();
    if list != k.list {
        tracing::info!(
            "DNS upstreams from {}: {}",
            path.display(),
            if list.is_empty() { "none".to_owned() } else { format!("{list:?}") }
        );
        k.warned_none = false;
    }
    k.list = list;
}

/// `raw` with a fresh random ID.
fn with_new_id(raw: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let id = getrandom::u32().map_err(|e| std::io::Error::other(e.to_string()))? as u16;
    let mut q = raw.to_vec();
    if let Some(h) = q.get_mut(..2) {
        h.copy_from_slice(&id.to_be_bytes());
    }
    Ok((id, q))
}

/// True if `reply` answers the query with `id` and `req`'s question.
fn answers(reply: &[u8], id: u16, req: &Request) -> bool {
    let mut d = BinDecoder::new(reply);
    let Ok(h) = Header::read(&mut d) else { return false };
    if h.metadata.id != id || h.metadata.message_type != MessageType::Response || h.counts.queries != 1 {
        return false;
    }
    Query::read(&mut d).is_ok_and(|q| q == req.query)
}

/// `reply` with the task's ID put back.
fn restored(mut reply: Vec<u8>, req: &Request) -> Vec<u8> {
    if let Some(h) = reply.get_mut(..2) {
        h.copy_from_slice(&req.id.to_be_bytes());
    }
    reply
}

/// One try over UDP: a connected socket of its own; datagrams that do not
/// answer the query are ignored.
async fn ask_udp(up: SocketAddr, raw: &[u8], req: &Request) -> std::io::Result<Vec<u8>> {
    let any: SocketAddr = if up.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0".parse().map_err(std::io::Error::other)?
    };
    let s = UdpSocket::bind(any).await?;
    s.connect(up).await?;
    let (id, q) = with_new_id(raw)?;
    s.send(&q).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = s.recv(&mut buf).await?;
        let reply = buf.get(..n).unwrap_or_default();
        if answers(reply, id, req) {
            return Ok(restored(reply.to_vec(), req));
        }
    }
}

/// One try over TCP (a query that came over TCP).
async fn ask_tcp(up: SocketAddr, raw: &[u8], req: &Request) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let (id, q) = with_new_id(raw)?;
    let n = u16::try_from(q.len()).map_err(std::io::Error::other)?;
    let mut out = n.to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    s.write_all(&out).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut reply).await?;
    if !answers(&reply, id, req) {
        return Err(std::io::Error::other("a reply that does not answer the query"));
    }
    Ok(restored(reply, req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_gives_three_nameservers_and_its_search_line() {
        let t = "# generated\nsearch example.com lab\nnameserver 198.18.30.10\nnameserver  198.18.30.11 \noptions ndots:2\nnameserver fe80::1%eth0\nnameserver 198.18.30.12\nnameserver bogus\n";
        let want: Vec<SocketAddr> =
            ["198.18.30.10:53", "198.18.30.11:53", "[fe80::1]:53"].iter().filter_map(|a| a.parse().ok()).collect();
        assert_eq!(nameservers(t), want);
        assert_eq!(search(t).as_deref(), Some("example.com lab"));
        assert_eq!(search("searchx a\nnameserver 1.1.1.1"), None);
        assert_eq!(parse_upstream("198.18.30.10"), Ok("198.18.30.10:53".parse().unwrap_or(want[0])));
        assert_eq!(parse_upstream("198.18.30.10:5353").map(|a| a.port()), Ok(5353));
        assert!(parse_upstream("dns.example").is_err());
    }

    #[test]
    fn upstreams_that_would_loop_are_left_out() {
        let list: Vec<SocketAddr> = ["169.254.77.1:53", "198.19.0.254:53", "198.18.30.10:53", "0.0.0.0:53"]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let f = Forwarder::new(Upstreams::Fixed(list), vec![Ipv4Addr::new(169, 254, 77, 1)], Limits::default());
        f.set_gateways(vec![Ipv4Addr::new(198, 19, 0, 254)]);
        assert_eq!(f.upstreams(), vec!["198.18.30.10:53".parse().unwrap_or(SocketAddr::from(([0; 4], 0)))]);
    }
}
