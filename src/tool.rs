//! `meshplane tool`: small traffic endpoints for the end-to-end tests, the
//! lab and the benchmarks (so they need nothing but this binary inside a
//! task's namespace). Every loop is bounded in bytes, packets and seconds.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// `meshplane tool …`
#[derive(clap::Subcommand, Debug)]
pub(crate) enum ToolCommand {
    /// Accept TCP connections; read a deterministic byte stream from each
    /// and check every byte; answer one line: `peer=IP:PORT bytes=N ok` (or
    /// `bad at OFFSET`), and print it. With `--name`, the line starts with
    /// `name=NAME`.
    TcpSink {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Connections to serve before exiting (0: until killed).
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// A name to report (which task answered).
        #[arg(long)]
        name: Option<String>,
        /// Seconds to wait for each connection's data.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Connect, send BYTES of the deterministic stream, print the sink's
    /// answer; exit non-zero unless it ends in `ok`.
    TcpSource {
        /// Address to connect to.
        #[arg(long)]
        connect: SocketAddr,
        /// Bytes to send.
        #[arg(long)]
        bytes: u64,
        /// Seconds for the whole exchange.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Echo UDP datagrams back to their sender until killed or idle for
    /// `--idle` seconds.
    UdpEcho {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Exit after this many idle seconds.
        #[arg(long, default_value_t = 60)]
        idle: u64,
    },
    /// A tiny HTTP server answering every request with its name and the
    /// client address it saw (the lab's tasks). Runs until killed.
    HttpName {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// The name to answer with.
        #[arg(long)]
        name: String,
    },
    /// GET a URL (`http://IP:PORT/PATH`) and print the body; non-zero exit
    /// on any failure.
    HttpGet {
        /// The URL.
        #[arg(long)]
        url: String,
        /// Seconds for the whole request.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Open CONNS TCP connections to an HTTP server and hold them all open
    /// at once, then send a GET on each and count the `200` answers;
    /// non-zero exit unless every one was answered.
    TcpHold {
        /// The server's address.
        #[arg(long)]
        connect: SocketAddr,
        /// Connections.
        #[arg(long, default_value_t = 100)]
        conns: u32,
        /// Milliseconds to hold them all open before the requests.
        #[arg(long, default_value_t = 1000)]
        hold_ms: u64,
        /// Seconds for the whole run.
        #[arg(long, default_value_t = 20)]
        timeout: u64,
    },
    /// Write the frames of a capture into a TAP device (created, or a
    /// persistent one attached), REPEAT times, at most PPS frames a second:
    /// for feeding crafted frames into a bridge.
    Inject {
        /// The TAP device.
        #[arg(long)]
        tap: String,
        /// Capture with the frames (classic pcap).
        #[arg(long)]
        pcap: std::path::PathBuf,
        /// Times to send the whole capture.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Frames per second at most.
        #[arg(long, default_value_t = 10_000)]
        pps: u32,
    },
    /// Send COUNT numbered datagrams to an echo server, one at a time,
    /// and print how many came back intact; exit non-zero if any was lost.
    UdpPing {
        /// Echo server address.
        #[arg(long)]
        connect: SocketAddr,
        /// Datagrams.
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// Payload bytes.
        #[arg(long, default_value_t = 512)]
        size: usize,
    },
    /// Send a DNS message given as hex bytes (malformed ones too) to a
    /// server, over UDP or TCP (with the 2-byte length), and print the
    /// reply's header: `rcode=… id=… flags=… qd=… an=… ns=… ar=…`. Exit
    /// non-zero if no reply came within the timeout.
    DnsRaw {
        /// The server, IP:PORT.
        #[arg(long)]
        server: SocketAddr,
        /// The message, hex (spaces allowed).
        #[arg(long)]
        hex: String,
        /// Over TCP.
        #[arg(long)]
        tcp: bool,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
}

/// Byte `i` of the deterministic stream.
fn stream_byte(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i as u8)
}

/// Runs a tool.
pub(crate) fn run(c: &ToolCommand) -> Result<()> {
    match c {
        ToolCommand::TcpSink { listen, count, name, timeout } => tcp_sink(listen, count, name, timeout),
        ToolCommand::TcpSource { connect, bytes, timeout } => tcp_source(connect, bytes, timeout),
        ToolCommand::UdpEcho { listen, idle } => udp_echo(listen, idle),
        ToolCommand::HttpName { listen, name } => http_name(listen, name),
        ToolCommand::HttpGet { url, timeout } => http_get(url, timeout),
        ToolCommand::TcpHold { connect, conns, hold_ms, timeout } => tcp_hold(connect, *conns, *hold_ms, *timeout),
        ToolCommand::Inject { tap, pcap, repeat, pps } => inject(tap, pcap, repeat, pps),
        ToolCommand::UdpPing { connect, count, size } => udp_ping(connect, count, size),
        ToolCommand::DnsRaw { server, hex, tcp, timeout } => {
            let reply = dns_raw(*server, &unhex(hex)?, *tcp, Duration::from_secs(*timeout))?;
            println!("{}", dns_header(&reply));
            Ok(())
        }
    }
}

/// Bytes from hex digits (whitespace ignored).
fn unhex(h: &str) -> Result<Vec<u8>> {
    let digits: Vec<u8> = h.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        bail!("--hex: an odd number of digits");
    }
    digits
        .chunks(2)
        .map(|p| {
            std::str::from_utf8(p).ok().and_then(|d| u8::from_str_radix(d, 16).ok()).context("--hex: not hex digits")
        })
        .collect()
}

/// `tool dns-raw`: `msg` to `server`, the reply back.
fn dns_raw(server: SocketAddr, msg: &[u8], tcp: bool, wait: Duration) -> Result<Vec<u8>> {
    if tcp {
        let mut s = TcpStream::connect_timeout(&server, wait).with_context(|| format!("connecting to {server}"))?;
        s.set_read_timeout(Some(wait))?;
        let n = u16::try_from(msg.len()).context("a DNS message over TCP is at most 65535 bytes")?;
        s.write_all(&n.to_be_bytes())?;
        s.write_all(msg)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).with_context(|| format!("{server}: no reply (closed or timed out)"))?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut reply).with_context(|| format!("{server}: the reply was cut short"))?;
        return Ok(reply);
    }
    let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let s = UdpSocket::bind(any)?;
    s.connect(server)?;
    s.set_read_timeout(Some(wait))?;
    s.send(msg)?;
    let mut buf = vec![0u8; 65535];
    let n = s.recv(&mut buf).with_context(|| format!("{server}: no reply within {wait:?}"))?;
    buf.truncate(n);
    Ok(buf)
}

/// A DNS reply's header, one line.
fn dns_header(r: &[u8]) -> String {
    let Some(h) = r.first_chunk::<12>() else { return format!("short reply: {} bytes", r.len()) };
    let word = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let rcode = match h[3] & 0x0f {
        0 => "NOERROR".to_owned(),
        1 => "FORMERR".to_owned(),
        2 => "SERVFAIL".to_owned(),
        3 => "NXDOMAIN".to_owned(),
        4 => "NOTIMP".to_owned(),
        5 => "REFUSED".to_owned(),
        n => format!("RCODE{n}"),
    };
    let names = [(h[2], 0x80, "qr"), (h[2], 0x04, "aa"), (h[2], 0x02, "tc"), (h[2], 0x01, "rd"), (h[3], 0x80, "ra")];
    let flags: Vec<&str> = names.iter().filter(|(b, m, _)| b & m != 0).map(|(_, _, n)| *n).collect();
    format!(
        "rcode={rcode} id=0x{:04x} opcode={} flags={} qd={} an={} ns={} ar={} bytes={}",
        word(0),
        (h[2] >> 3) & 0x0f,
        flags.join(","),
        word(4),
        word(6),
        word(8),
        word(10),
        r.len()
    )
}

/// `tool tcp-hold`: many connections open at once, then one request on
/// each.
fn tcp_hold(addr: &SocketAddr, conns: u32, hold_ms: u64, timeout: u64) -> Result<()> {
    let deadline = Instant::now().checked_add(Duration::from_secs(timeout)).context("--timeout: too large")?;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let mut open = Vec::with_capacity(conns as usize);
    for i in 0..conns {
        let s = TcpStream::connect_timeout(addr, left().min(Duration::from_secs(5)))
            .with_context(|| format!("connection {i} of {conns} to {addr}"))?;
        open.push(s);
    }
    println!("tcp-hold: {} connections open at once", open.len());
    std::thread::sleep(Duration::from_millis(hold_ms).min(left()));
    for s in &mut open {
        write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    }
    let mut ok = 0u32;
    for s in &mut open {
        s.set_read_timeout(Some(left()))?;
        let mut resp = Vec::new();
        if s.read_to_end(&mut resp).is_ok() && (resp.starts_with(b"HTTP/1.1 200") || resp.starts_with(b"HTTP/1.0 200"))
        {
            ok += 1;
        }
    }
    println!("tcp-hold: {ok}/{conns} answered");
    if ok != conns {
        bail!("{} of {conns} connections were not answered", conns - ok);
    }
    Ok(())
}

/// `tool tcp-sink`: checks every connection's stream, answers one line.
fn tcp_sink(listen: &SocketAddr, count: &u64, name: &Option<String>, timeout: &u64) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let mut served = 0;
    while *count == 0 || served < *count {
        let (mut s, peer) = l.accept().context("accepting")?;
        s.set_read_timeout(Some(Duration::from_secs(*timeout)))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        let mut bad = None;
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => bail!("reading from {peer}: {e}"),
            };
            if bad.is_none()
                && let Some(k) = buf[..n].iter().enumerate().position(|(k, b)| *b != stream_byte(at + k as u64))
            {
                bad = Some(at + k as u64);
            }
            at += n as u64;
        }
        let who = name.as_ref().map(|n| format!("name={n} ")).unwrap_or_default();
        let line = match bad {
            None => format!("{who}peer={peer} bytes={at} ok"),
            Some(o) => format!("{who}peer={peer} bytes={at} bad at {o}"),
        };
        println!("{line}");
        let _ = writeln!(s, "{line}");
        served += 1;
    }
    Ok(())
}

/// `tool tcp-source`: sends the stream, prints the sink's answer.
fn tcp_source(connect: &SocketAddr, bytes: &u64, timeout: &u64) -> Result<()> {
    let t = Duration::from_secs(*timeout);
    let mut s = TcpStream::connect_timeout(connect, t).with_context(|| format!("connecting to {connect}"))?;
    s.set_write_timeout(Some(t))?;
    s.set_read_timeout(Some(t))?;
    let mut sent = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    while sent < *bytes {
        let n = chunk.len().min((*bytes - sent) as usize);
        for (k, b) in chunk[..n].iter_mut().enumerate() {
            *b = stream_byte(sent + k as u64);
        }
        s.write_all(&chunk[..n]).with_context(|| format!("sending to {connect}"))?;
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).context("reading the sink's answer")?;
    let line = line.trim_end();
    println!("{line}");
    if !line.ends_with(" ok") {
        bail!("the sink did not confirm the stream: {line:?}");
    }
    Ok(())
}

/// `tool udp-echo`: echoes datagrams until idle.
fn udp_echo(listen: &SocketAddr, idle: &u64) -> Result<()> {
    let s = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    s.set_read_timeout(Some(Duration::from_secs(*idle)))?;
    let mut buf = vec![0u8; 65536];
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = s.send_to(&buf[..n], from);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Ok(());
            }
            Err(e) => bail!("receiving: {e}"),
        }
    }
}

/// `tool http-name`: answers every request with its name and the client address.
fn http_name(listen: &SocketAddr, name: &str) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    loop {
        let Ok((mut s, peer)) = l.accept() else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let body = format!("{name} saw {peer}\n");
        let _ =
            write!(s, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    }
}

/// `tool http-get`: one GET, the body printed.
fn http_get(url: &str, timeout: &u64) -> Result<()> {
    let rest = url.strip_prefix("http://").with_context(|| format!("{url:?}: only http:// URLs"))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let addr: SocketAddr = host.parse().with_context(|| format!("{host:?}: expected IP:PORT"))?;
    let t = Duration::from_secs(*timeout);
    let mut s = TcpStream::connect_timeout(&addr, t).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).with_context(|| format!("reading from {addr}"))?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{addr}: {}", head.lines().next().unwrap_or("no answer"));
    }
    print!("{body}");
    Ok(())
}

/// `tool inject`: a capture's frames into a TAP device.
fn inject(tap: &str, pcap: &std::path::Path, repeat: &u32, pps: &u32) -> Result<()> {
    use meshplane_dataplane::io::Port;
    let f = std::fs::File::open(pcap).with_context(|| format!("opening {}", pcap.display()))?;
    let frames =
        meshplane_dataplane::pcap::read(BufReader::new(f)).with_context(|| format!("reading {}", pcap.display()))?;
    let mut port = meshplane_dataplane::io::tap::TapPort::open(tap)?;
    wait_until_forwarding(tap);
    let gap = Duration::from_secs_f64(1.0 / f64::from((*pps).max(1)));
    let (mut sent, mut refused) = (0u64, 0u64);
    let start = Instant::now();
    let mut next = start;
    for _ in 0..*repeat {
        for r in &frames {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next += gap;
            if port.tx_copy(&r.data) { sent += 1 } else { refused += 1 }
        }
    }
    println!("inject: {sent} frames sent, {refused} refused, in {:.2} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The device's carrier comes up when it is attached, and a bridge it
/// belongs to starts forwarding from it only when the kernel's link watch
/// gets to it (up to a second later): until then every frame is dropped.
/// Waits (at most 5 s) for the bridge port to forward; a device in no
/// bridge is ready at once.
fn wait_until_forwarding(dev: &str) {
    const FORWARDING: &str = "3";
    let state = format!("/sys/class/net/{dev}/brport/state");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match std::fs::read_to_string(&state) {
            Ok(s) if s.trim() != FORWARDING => std::thread::sleep(Duration::from_millis(10)),
            _ => return,
        }
    }
    eprintln!("inject: {dev} is still not forwarding in its bridge after 5 s; sending anyway");
}

/// `tool udp-ping`: numbered datagrams to an echo server, one at a time.
fn udp_ping(connect: &SocketAddr, count: &u32, size: &usize) -> Result<()> {
    let s = UdpSocket::bind(if connect.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.connect(connect)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let size = (*size).max(8);
    let mut ok = 0u32;
    let start = Instant::now();
    let mut buf = vec![0u8; size + 16];
    for i in 0..*count {
        let mut msg = vec![0u8; size];
        for (k, b) in msg.iter_mut().enumerate() {
            *b = stream_byte(u64::from(i) * 7919 + k as u64);
        }
        msg[..4].copy_from_slice(&i.to_be_bytes());
        s.send(&msg)?;
        // Wait for this datagram's echo (skipping late ones).
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            match s.recv(&mut buf) {
                Ok(n) if buf[..n] == msg[..] => {
                    ok += 1;
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    println!("udp: {ok}/{count} echoed intact in {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    if ok != *count {
        bail!("{} of {count} datagrams lost or damaged", count - ok);
    }
    Ok(())
}

#[cfg(test)]
mod dns_raw_tests {
    use super::*;

    #[test]
    fn dns_raw_sends_the_bytes_and_prints_the_replys_header() {
        assert_eq!(unhex("12 34 01").ok(), Some(vec![0x12, 0x34, 0x01]));
        assert!(unhex("123").is_err() && unhex("zz").is_err());
        let srv = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let at = srv.local_addr().expect("addr");
        let echo = std::thread::spawn(move || {
            let mut b = [0u8; 64];
            let (n, from) = srv.recv_from(&mut b).expect("the query");
            // FORMERR back, the ID kept, QR and RA set, no counts.
            let mut r = b[..12].to_vec();
            r[2] = 0x81;
            r[3] = 0x81;
            r[4..].fill(0);
            srv.send_to(&r, from).expect("reply");
            b[..n].to_vec()
        });
        let reply = dns_raw(at, &unhex("abcd 0100 0000 0000 0000 0000").expect("hex"), false, Duration::from_secs(2))
            .expect("a reply");
        assert_eq!(echo.join().ok(), Some(vec![0xab, 0xcd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), "sent as given");
        assert_eq!(dns_header(&reply), "rcode=FORMERR id=0xabcd opcode=0 flags=qr,rd,ra qd=0 an=0 ns=0 ar=0 bytes=12");
        assert_eq!(dns_header(&[1, 2]), "short reply: 2 bytes");
    }
}
