//! The plugin itself (`meshplane-cni`, installed as `meshplane`): one CNI
//! command from the environment and stdin, one request to the node over
//! its admin socket, and the result or error object on stdout
//! (`docs/cni-design.md` sections 2 and 4).
//!
//! - VERSION answers from the configuration alone (libcni runs it while
//!   loading networks: it never contacts the node).
//! - ADD, DEL, CHECK, STATUS and GC send a [`CniRequest`] inside the admin
//!   request `{"op": "cni", "request": …}`, framed as the admin API frames
//!   (a 4-byte little-endian length, then JSON), with a deadline: the
//!   conflist's `timeoutSecs` + 5 s for ADD, 10 s for the others.
//! - A DEL that finds no node spools itself ([`crate::spool`]) and
//!   succeeds; STATUS's failures are all code 50.
//!
//! Nothing but the final JSON goes to stdout; stderr gets one line when a
//! DEL is spooled, and the "about" line when no `CNI_COMMAND` is set.

use crate::conf::{MAX_CONF, NetConf, Params, service};
use crate::failure::Failure;
use crate::proto::{AddReq, CheckReq, CniAnswer, CniRequest, GcReq, Key, StatusReq};
use crate::result::{add_result, error_json, status_error_json, version_json};
use crate::{SUPPORTED, spool};
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The node's admin socket when the conflist names none.
pub const DEFAULT_SOCKET: &str = "/var/lib/meshplane/admin.sock";

/// What the plugin prints on stderr when run without `CNI_COMMAND` (as
/// the reference plugins' "about"); `meshplane cni install` recognises its
/// own plugin by this line's start, [`ABOUT_PREFIX`].
pub const ABOUT: &str = concat!(
    "meshplane CNI plugin ",
    env!("CARGO_PKG_VERSION"),
    " (CNI 0.4.0, 1.0.0, 1.1.0): container runtimes run it; see meshplane cni install"
);

/// The start of [`ABOUT`] that every version of the plugin prints.
pub const ABOUT_PREFIX: &str = "meshplane CNI plugin ";

/// How long the node may take to answer anything but ADD.
const DEADLINE: Duration = Duration::from_secs(10);

/// How long the node may take beyond ADD's `timeoutSecs` (its own wait
/// for the port) to answer.
const ADD_SLACK: Duration = Duration::from_secs(5);

/// The largest answer read from the node.
const MAX_ANSWER: usize = 1 << 20;

/// The default `timeoutSecs`.
const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// Runs one CNI command: `var` reads the environment, the network
/// configuration comes on `stdin`, the result or error object goes to
/// `out`. The process's exit code: 0, or 1 after an error object.
pub fn run(var: &dyn Fn(&str) -> Option<String>, stdin: impl Read, mut out: impl Write, mut err: impl Write) -> i32 {
    let Some(command) = var("CNI_COMMAND").filter(|c| !c.is_empty()) else {
        let _ = writeln!(err, "{ABOUT}");
        return 0;
    };
    let mut input = Vec::new();
    if let Err(e) = stdin.take(MAX_CONF as u64 + 1).read_to_end(&mut input) {
        let f = Failure::Io(format!("reading the network configuration from stdin: {e}"));
        return fail(&mut out, &command, None, &f);
    }
    // The version asked, for VERSION's answer and for error objects
    // printed before the configuration is checked.
    let asked = serde_json::from_slice::<Value>(&input)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned));
    if command == "VERSION" {
        return print(&mut out, &version_json(asked.as_deref()));
    }
    let version = asked.filter(|v| SUPPORTED.contains(&v.as_str()));
    match command_of(var, &command, &input, &mut err) {
        Ok(None) => 0,
        Ok(Some(result)) => print(&mut out, &result),
        Err(f) => fail(&mut out, &command, version.as_deref(), &f),
    }
}

/// Prints `v` on `out`: 0, or 1 if it cannot be written (the runtime
/// sees no result either way).
fn print(out: &mut impl Write, v: &Value) -> i32 {
    match serde_json::to_writer(&mut *out, v).map_err(std::io::Error::other).and_then(|()| writeln!(out)) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Prints the error object of `f` (STATUS: code 50): exit code 1.
fn fail(out: &mut impl Write, command: &str, version: Option<&str>, f: &Failure) -> i32 {
    let v = if command == "STATUS" { status_error_json(version, f) } else { error_json(version, f) };
    print(out, &v);
    1
}

/// One command but VERSION: what to print on success (ADD's result), or
/// nothing.
fn command_of(
    var: &dyn Fn(&str) -> Option<String>,
    command: &str,
    input: &[u8],
    err: &mut impl Write,
) -> Result<Option<Value>, Failure> {
    let p = Params::from_env(var)?;
    let c = NetConf::parse(input)?;
    let socket = c.socket.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let node = Node { socket: &socket, network: &c.name };
    let key = |p: &Params| -> Result<Key, Failure> {
        Ok(Key {
            network: c.name.clone(),
            container_id: p.need(&p.container_id, "CNI_CONTAINERID")?.to_owned(),
            ifname: p.need(&p.ifname, "CNI_IFNAME")?.to_owned(),
        })
    };
    match command {
        "ADD" => {
            let key = key(&p)?;
            let netns = p.need(&p.netns, "CNI_NETNS")?.to_owned();
            if c.prev_result.is_some() {
                return Err(Failure::Config(format!(
                    "network {}: meshplane makes the container's interface: put it first in \"plugins\"",
                    c.name
                )));
            }
            let timeout_secs = c.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
            let req = CniRequest::Add(AddReq {
                key,
                netns: netns.clone(),
                service: service(&c, &p)?,
                weight: c.weight.unwrap_or(1),
                name: p.args.get("K8S_POD_NAME").cloned(),
                timeout_secs,
            });
            match node.call(&req, Duration::from_secs(timeout_secs) + ADD_SLACK)? {
                CniAnswer::Added(a) => Ok(Some(add_result(&c.cni_version, &a, &netns))),
                other => Err(node.unexpected("ADD", &other)),
            }
        }
        "DEL" => {
            let key = key(&p)?;
            match node.send(&CniRequest::Del(key.clone()), DEADLINE) {
                Ok(CniAnswer::Done | CniAnswer::Removed(_)) => Ok(None),
                Ok(other) => Err(node.unexpected("DEL", &other)),
                Err(Fault::Node(f)) => Err(f),
                // No node, or one that did not answer: the node finishes
                // it from the spool (a DEL it did get is then repeated,
                // which is harmless).
                Err(Fault::Down(why) | Fault::Lost(why)) => {
                    let wrote = spool::write(&socket, &key).map_err(|e| {
                        Failure::Io(format!(
                            "{why}; and spooling the DEL of {key} in {}: {e}",
                            spool::spool_dir(&socket).display()
                        ))
                    })?;
                    let _ = match wrote {
                        Some(path) => writeln!(
                            err,
                            "meshplane-cni: DEL of {key} spooled to {} (the node finishes it when it runs): {why}",
                            path.display()
                        ),
                        None => writeln!(
                            err,
                            "meshplane-cni: DEL of {key}: no node ever ran at {} (its directory does not exist): nothing to delete",
                            socket.display()
                        ),
                    };
                    Ok(None)
                }
            }
        }
        "CHECK" => {
            let req = CniRequest::Check(CheckReq { key: key(&p)?, ip: prev_address(c.prev_result.as_ref())? });
            match node.call(&req, DEADLINE)? {
                CniAnswer::Done => Ok(None),
                other => Err(node.unexpected("CHECK", &other)),
            }
        }
        "STATUS" => match node.call(&CniRequest::Status(StatusReq { service: c.service.clone() }), DEADLINE)? {
            CniAnswer::Done => Ok(None),
            other => Err(node.unexpected("STATUS", &other)),
        },
        "GC" => {
            let valid = c.valid_attachments.as_ref().ok_or_else(|| {
                Failure::Config(format!(
                    "network {}: GC without \"cni.dev/valid-attachments\" would detach every container: the runtime must list the ones it has",
                    c.name
                ))
            })?;
            let valid = valid.iter().map(|a| (a.container_id.clone(), a.ifname.clone())).collect();
            match node.call(&CniRequest::Gc(GcReq { network: c.name.clone(), valid }), DEADLINE)? {
                CniAnswer::Removed(_) | CniAnswer::Done => Ok(None),
                other => Err(node.unexpected("GC", &other)),
            }
        }
        other => Err(Failure::Env {
            var: "CNI_COMMAND".into(),
            why: format!("{other:?} is not a command: ADD, DEL, CHECK, STATUS, GC or VERSION"),
        }),
    }
}

/// CHECK: the first address of the previous result, as `198.19.0.5/24`.
fn prev_address(prev: Option<&Value>) -> Result<Option<(Ipv4Addr, u8)>, Failure> {
    let Some(a) = prev.and_then(|p| p.get("ips")).and_then(|i| i.get(0)).and_then(|i| i.get("address")) else {
        return Ok(None);
    };
    let bad = || Failure::Decode(format!("prevResult's ips[0].address {a}: not an IPv4 address/prefix"));
    let (ip, prefix) = a.as_str().and_then(|s| s.split_once('/')).ok_or_else(bad)?;
    let ip = ip.parse::<Ipv4Addr>().map_err(|_| bad())?;
    let prefix = prefix.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
    Ok(Some((ip, prefix)))
}

/// Why a request got no answer from the node.
enum Fault {
    /// Nothing listens on the socket (code 11's message).
    Down(Failure),
    /// The node took it but the exchange broke or timed out.
    Lost(Failure),
    /// The node answered with a failure (or could not be understood).
    Node(Failure),
}

impl From<Fault> for Failure {
    fn from(f: Fault) -> Failure {
        match f {
            Fault::Down(f) | Fault::Lost(f) | Fault::Node(f) => f,
        }
    }
}

/// The node at the conflist's socket.
struct Node<'a> {
    /// Its admin socket.
    socket: &'a Path,
    /// The conflist's name (for the messages).
    network: &'a str,
}

impl Node<'_> {
    /// Sends `req`; the node's answer, every fault a [`Failure`].
    fn call(&self, req: &CniRequest, deadline: Duration) -> Result<CniAnswer, Failure> {
        self.send(req, deadline).map_err(Failure::from)
    }

    /// An answer that does not fit the request.
    fn unexpected(&self, command: &str, a: &CniAnswer) -> Failure {
        let a = serde_json::to_string(a).unwrap_or_default();
        Failure::Io(format!("the node at {} answered {command} with {a}", self.socket.display()))
    }

    /// Sends `req` as the admin request `{"op": "cni", "request": req}`
    /// and reads the answer within `deadline`.
    fn send(&self, req: &CniRequest, deadline: Duration) -> Result<CniAnswer, Fault> {
        let sock = self.socket.display();
        let s = UnixStream::connect(self.socket).map_err(|e| match e.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => Fault::Down(Failure::Later(format!(
                "meshplane node not running: nothing answers on {sock} (start it: meshplane node run; or set \"socket\" in conflist {})",
                self.network
            ))),
            _ => Fault::Down(Failure::Io(format!("talking to the node at {sock}: {e}"))),
        })?;
        let until = Instant::now() + deadline;
        let lost = |e: std::io::Error| {
            Fault::Lost(match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                    Failure::Later(format!("the node at {sock} did not answer in {deadline:?} (see the node's log)"))
                }
                ErrorKind::UnexpectedEof => {
                    Failure::Io(format!("talking to the node at {sock}: it closed the connection without an answer"))
                }
                _ => Failure::Io(format!("talking to the node at {sock}: {e}")),
            })
        };
        let body = serde_json::to_vec(&json!({ "op": "cni", "request": req }))
            .map_err(|e| Fault::Node(Failure::Io(format!("encoding the request: {e}"))))?;
        let len = u32::try_from(body.len()).map_err(|_| Fault::Node(Failure::Io("the request is too large".into())))?;
        let mut s = Deadline { s, until };
        s.write_all(&len.to_le_bytes()).and_then(|()| s.write_all(&body)).map_err(lost)?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).map_err(lost)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_ANSWER {
            return Err(Fault::Node(Failure::Io(format!(
                "the node at {sock} announced an answer of {len} bytes (more than {MAX_ANSWER})"
            ))));
        }
        let mut answer = vec![0u8; len];
        s.read_exact(&mut answer).map_err(lost)?;
        self.decode(&answer).map_err(Fault::Node)
    }

    /// The admin answer `{"Ok": CniAnswer}` or `{"Err": {"Cni": Failure}}`;
    /// any other error is a node that does not serve CNI (too old).
    fn decode(&self, answer: &[u8]) -> Result<CniAnswer, Failure> {
        let sock = self.socket.display();
        let garbled = |e: &dyn std::fmt::Display| Failure::Io(format!("the node at {sock} answered garbled JSON: {e}"));
        let v: Value = serde_json::from_slice(answer).map_err(|e| garbled(&e))?;
        if let Some(ok) = v.get("Ok") {
            return serde_json::from_value(ok.clone()).map_err(|e| garbled(&format!("{e}: {ok}")));
        }
        let Some(e) = v.get("Err") else { return Err(garbled(&v)) };
        match e.get("Cni").map(|f| serde_json::from_value::<Failure>(f.clone())) {
            Some(Ok(f)) => Err(f),
            Some(Err(_)) => Err(Failure::Refused(format!(
                "the node at {sock} failed with an error this plugin does not know: upgrade the plugin ({e})"
            ))),
            None => Err(Failure::Refused(format!("the node at {sock} does not serve CNI requests: upgrade it ({e})"))),
        }
    }
}

/// A socket whose reads and writes all end by one instant.
struct Deadline {
    /// The connection.
    s: UnixStream,
    /// When every read and write must have ended.
    until: Instant,
}

impl Deadline {
    /// The time left, or a timeout.
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() { Err(ErrorKind::TimedOut.into()) } else { Ok(left) }
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.s.set_read_timeout(Some(self.left()?))?;
        self.s.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.s.set_write_timeout(Some(self.left()?))?;
        self.s.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::result::Attached;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::thread::JoinHandle;

    /// A temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let d = std::env::temp_dir().join(format!("mpcni-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir(&d).unwrap();
            TempDir(d)
        }

        fn sock(&self) -> PathBuf {
            self.0.join("admin.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A node on `sock` that takes one admin request, answers `answer`
    /// (the admin body), and hands back the request.
    fn fake_node(sock: &Path, answer: Value) -> JoinHandle<Value> {
        let _ = std::fs::remove_file(sock);
        let l = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
            s.read_exact(&mut body).unwrap();
            let a = serde_json::to_vec(&answer).unwrap();
            s.write_all(&(a.len() as u32).to_le_bytes()).unwrap();
            s.write_all(&a).unwrap();
            serde_json::from_slice(&body).unwrap()
        })
    }

    /// The configuration a runtime hands the plugin, with the socket.
    fn conf(sock: &Path, extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"web-net","type":"meshplane","service":"web","socket":{}{extra}}}"#,
            serde_json::to_string(sock).unwrap()
        )
    }

    /// Runs `command` with the usual environment (minus `without`, plus
    /// `args` in CNI_ARGS): the exit code, stdout, stderr.
    fn cni(command: &str, without: &str, args: &str, conf: &str) -> (i32, String, String) {
        let var = |k: &str| {
            if k == without {
                return None;
            }
            let v = match k {
                "CNI_COMMAND" => command,
                "CNI_CONTAINERID" => "abc123",
                "CNI_NETNS" => "/run/netns/x",
                "CNI_IFNAME" => "eth0",
                "CNI_ARGS" => args,
                "CNI_PATH" => "/opt/cni/bin",
                _ => return None,
            };
            Some(v.to_owned())
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(&var, conf.as_bytes(), &mut out, &mut err);
        (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    /// An error object's code and message.
    fn error(out: &str) -> (u64, String) {
        let v: Value = serde_json::from_str(out).unwrap();
        (v["code"].as_u64().unwrap(), v["msg"].as_str().unwrap().to_owned())
    }

    #[test]
    fn add_sends_the_attachment_and_prints_the_result() {
        let d = TempDir::new();
        let attached = Attached {
            host_iface: Some("mpt1c9e0f3a".into()),
            ifname: "eth0".into(),
            mac: "02:42:c6:13:00:05".into(),
            mtu: 1450,
            ip: (Ipv4Addr::new(198, 19, 0, 5), 24),
            gateway: Ipv4Addr::new(198, 19, 0, 254),
            dns: Some(vec!["example.com".into()]),
        };
        let node = fake_node(&d.sock(), json!({ "Ok": CniAnswer::Added(attached) }));
        let (code, out, err) = cni("ADD", "", "IgnoreUnknown=1;K8S_POD_NAME=pod-1", &conf(&d.sock(), ""));
        assert_eq!((code, err.as_str()), (0, ""), "{out}");
        assert_eq!(
            node.join().unwrap(),
            json!({ "op": "cni", "request": { "add": {
                "key": { "network": "web-net", "container_id": "abc123", "ifname": "eth0" },
                "netns": "/run/netns/x", "service": "web", "weight": 1, "name": "pod-1", "timeout_secs": 10 } } })
        );
        assert!(out.ends_with('\n') && out.lines().count() == 1, "{out:?}");
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [{ "name": "mpt1c9e0f3a" },
                               { "name": "eth0", "mac": "02:42:c6:13:00:05", "mtu": 1450, "sandbox": "/run/netns/x" }],
                "ips": [{ "address": "198.19.0.5/24", "gateway": "198.19.0.254", "interface": 1 }],
                "routes": [{ "dst": "0.0.0.0/0", "gw": "198.19.0.254" }],
                "dns": { "nameservers": ["198.19.0.254"], "search": ["example.com"], "options": ["ndots:0"] }
            })
        );
    }

    #[test]
    fn no_node_is_code_11_naming_the_socket_and_the_network() {
        let d = TempDir::new();
        let (code, out, _) = cni("ADD", "", "", &conf(&d.sock(), ""));
        assert_eq!(code, 1);
        let (c, msg) = error(&out);
        assert_eq!(c, 11);
        let want = format!(
            "meshplane node not running: nothing answers on {} (start it: meshplane node run; or set \"socket\" in conflist web-net)",
            d.sock().display()
        );
        assert_eq!(msg, want);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["cniVersion"], "1.1.0");
    }

    #[test]
    fn a_node_that_does_not_serve_cni_is_refused_with_106() {
        let d = TempDir::new();
        let node = fake_node(&d.sock(), json!({ "Err": { "BadRequest": "unknown variant `cni`" } }));
        let (code, out, _) = cni("ADD", "", "", &conf(&d.sock(), ""));
        node.join().unwrap();
        assert_eq!(code, 1);
        let (c, msg) = error(&out);
        assert_eq!(c, 106);
        assert!(
            msg.contains("does not serve CNI requests: upgrade it ({\"BadRequest\":\"unknown variant `cni`\"})"),
            "{msg}"
        );
    }

    #[test]
    fn the_nodes_cni_failure_is_printed_with_its_code() {
        let d = TempDir::new();
        let node = fake_node(&d.sock(), json!({ "Err": { "Cni": Failure::UnknownService("wbe".into()) } }));
        let (code, out, _) = cni("ADD", "", "MESHPLANE_SERVICE=wbe", &conf(&d.sock(), r#","services":["*"]"#));
        assert_eq!(node.join().unwrap()["request"]["add"]["service"], "wbe");
        assert_eq!(code, 1);
        assert_eq!(error(&out), (100, Failure::UnknownService("wbe".into()).to_string()));
        // A failure this plugin does not know (a newer node): 106, shown.
        let node = fake_node(&d.sock(), json!({ "Err": { "Cni": { "Quota": "x" } } }));
        let (_, out, _) = cni("ADD", "", "", &conf(&d.sock(), ""));
        node.join().unwrap();
        let (c, msg) = error(&out);
        assert_eq!(c, 106);
        assert!(msg.contains("upgrade the plugin ({\"Cni\":{\"Quota\":\"x\"}})"), "{msg}");
    }

    /// The spooled files of `d`'s node.
    fn spooled(d: &TempDir) -> Vec<(String, Value)> {
        let dir = spool::spool_dir(&d.sock());
        let mut files: Vec<_> =
            std::fs::read_dir(&dir).map(|r| r.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| {
                let v = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                (p.file_name().unwrap().to_string_lossy().into_owned(), v)
            })
            .collect()
    }

    #[test]
    fn del_with_the_node_down_is_spooled_once_and_succeeds() {
        let d = TempDir::new();
        let key = Key { network: "web-net".into(), container_id: "abc123".into(), ifname: "eth0".into() };
        let want = vec![(
            spool::spool_name(&key),
            json!({ "network": "web-net", "container_id": "abc123", "ifname": "eth0" }),
        )];
        // containerd's DEL: no CNI_NETNS; nothing on stdout, one line on stderr.
        let (code, out, err) = cni("DEL", "CNI_NETNS", "", &conf(&d.sock(), ""));
        assert_eq!((code, out.as_str()), (0, ""), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("spooled to") && err.contains("nothing answers on"), "{err}");
        assert_eq!(spooled(&d), want);
        let (code, _, _) = cni("DEL", "", "", &conf(&d.sock(), ""));
        assert_eq!(code, 0);
        assert_eq!(spooled(&d), want, "a repeated DEL replaces its own file");
        // A node that takes the DEL and closes without answering: spooled too.
        let _ = std::fs::remove_file(d.sock());
        let l = UnixListener::bind(d.sock()).unwrap();
        let t = std::thread::spawn(move || drop(l.accept().unwrap()));
        let (code, _, err) = cni("DEL", "", "", &conf(&d.sock(), ""));
        t.join().unwrap();
        assert_eq!(code, 0, "{err}");
        assert_eq!(spooled(&d), want);
        // No state directory: no node ever ran there, nothing to delete.
        let gone = d.0.join("nowhere/admin.sock");
        let (code, _, err) = cni("DEL", "", "", &conf(&gone, ""));
        assert_eq!(code, 0);
        assert!(err.contains("nothing to delete"), "{err}");
        assert!(!d.0.join("nowhere").exists());
    }

    #[test]
    fn del_answered_by_the_node_spools_nothing() {
        let d = TempDir::new();
        let node = fake_node(&d.sock(), json!({ "Ok": "done" }));
        let (code, out, err) = cni("DEL", "CNI_NETNS", "IP=198.19.0.9", &conf(&d.sock(), ""));
        assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
        assert_eq!(
            node.join().unwrap()["request"],
            json!({ "del": { "network": "web-net", "container_id": "abc123", "ifname": "eth0" } })
        );
        assert!(spooled(&d).is_empty());
    }

    #[test]
    fn version_never_contacts_the_node() {
        let d = TempDir::new();
        let (code, out, _) = cni("VERSION", "", "", r#"{"cniVersion":"0.3.1"}"#);
        assert_eq!(code, 0);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({ "cniVersion": "0.3.1", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"] })
        );
        let (code, out, _) = cni("VERSION", "", "", &conf(&d.sock(), ""));
        assert_eq!((code, serde_json::from_str::<Value>(&out).unwrap()["cniVersion"].as_str()), (0, Some("1.1.0")));
        assert!(spooled(&d).is_empty());
    }

    #[test]
    fn status_failures_are_code_50() {
        let d = TempDir::new();
        let (code, out, _) = cni("STATUS", "", "", &conf(&d.sock(), ""));
        assert_eq!(code, 1);
        let (c, msg) = error(&out);
        assert_eq!(c, 50);
        assert!(msg.starts_with("meshplane node not running"), "{msg}");
        // Whatever the cause: a malformed conflist too.
        assert_eq!(error(&cni("STATUS", "", "", "{").1).0, 50);
        let node = fake_node(&d.sock(), json!({ "Ok": "done" }));
        assert_eq!(cni("STATUS", "", "", &conf(&d.sock(), "")), (0, String::new(), String::new()));
        assert_eq!(node.join().unwrap()["request"], json!({ "status": { "service": "web" } }));
    }

    #[test]
    fn check_sends_the_previous_address_and_gc_the_valid_attachments() {
        let d = TempDir::new();
        let prev = r#","prevResult":{"cniVersion":"1.1.0","ips":[{"address":"198.19.0.5/24","interface":1}]}"#;
        let node = fake_node(&d.sock(), json!({ "Ok": "done" }));
        assert_eq!(cni("CHECK", "", "", &conf(&d.sock(), prev)).0, 0);
        assert_eq!(
            node.join().unwrap()["request"]["check"],
            json!({ "key": { "network": "web-net", "container_id": "abc123", "ifname": "eth0" }, "ip": ["198.19.0.5", 24] })
        );
        let bad = r#","prevResult":{"ips":[{"address":"fd00::5/64"}]}"#;
        assert_eq!(error(&cni("CHECK", "", "", &conf(&d.sock(), bad)).1).0, 6);
        let valid = r#","cni.dev/valid-attachments":[{"containerID":"c3","ifname":"eth0"}]"#;
        let node = fake_node(&d.sock(), json!({ "Ok": { "removed": ["web.2"] } }));
        assert_eq!(cni("GC", "", "", &conf(&d.sock(), valid)).0, 0);
        assert_eq!(
            node.join().unwrap()["request"],
            json!({ "gc": { "network": "web-net", "valid": [["c3", "eth0"]] } })
        );
        // GC without the list would detach everything: refused.
        assert_eq!(error(&cni("GC", "", "", &conf(&d.sock(), "")).1).0, 7);
    }

    #[test]
    fn bad_input_gets_its_code_before_the_node_is_asked() {
        let d = TempDir::new();
        let (code, out, _) = cni("ADD", "", "", "{\"cniVersion\":");
        assert_eq!((code, error(&out).0), (1, 6));
        let (c, msg) = error(&cni("ADD", "CNI_IFNAME", "", &conf(&d.sock(), "")).1);
        assert_eq!(c, 4);
        assert!(msg.starts_with("CNI_IFNAME"), "{msg}");
        let prev = r#","prevResult":{"cniVersion":"1.1.0"}"#;
        let (c, msg) = error(&cni("ADD", "", "", &conf(&d.sock(), prev)).1);
        assert_eq!(c, 7);
        assert!(msg.contains("put it first in \"plugins\""), "{msg}");
        assert_eq!(error(&cni("ADD", "", "IP=198.19.0.9", &conf(&d.sock(), "")).1).0, 2);
        assert_eq!(error(&cni("FROB", "", "", &conf(&d.sock(), "")).1).0, 4);
        // An unsupported version's error object says the newest version.
        let out = cni("ADD", "", "", r#"{"cniVersion":"0.3.1","name":"n","type":"meshplane"}"#).1;
        assert_eq!(error(&out).0, 1);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["cniVersion"], "1.1.0");
        assert!(spooled(&d).is_empty());
    }

    #[test]
    fn a_node_that_does_not_answer_in_time_is_code_11() {
        let d = TempDir::new();
        let l = UnixListener::bind(d.sock()).unwrap();
        // Takes the request and holds the connection open, answering nothing.
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let node = Node { socket: &d.sock(), network: "web-net" };
        let req = CniRequest::Status(StatusReq { service: None });
        let started = Instant::now();
        let Err(Fault::Lost(f)) = node.send(&req, Duration::from_millis(300)) else { panic!("an answer") };
        assert!(started.elapsed() >= Duration::from_millis(300) && started.elapsed() < Duration::from_secs(5));
        assert_eq!(f.code(), 11);
        assert!(f.to_string().contains("did not answer in 300ms"), "{f}");
        // The connection is closed once send returns: the node's read ends.
        t.join().unwrap();
    }

    #[test]
    fn without_a_command_it_says_what_it_is() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(run(&|_: &str| None, &b""[..], &mut out, &mut err), 0);
        assert!(out.is_empty());
        assert_eq!(String::from_utf8(err).unwrap(), format!("{ABOUT}\n"));
        assert!(ABOUT.starts_with(ABOUT_PREFIX));
    }
}
