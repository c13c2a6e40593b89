//! A small lab in network namespaces for the end-to-end tests: namespaces
//! named `mp-<tag>-…`, processes started in them and stopped by pid, all
//! removed on drop (also when a test fails). Addresses from 198.18.0.0/15
//! only.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_meshplane");

/// True when running as root (owner of our own /proc entry).
pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Skips the test (returns) unless root.
#[macro_export]
macro_rules! need_root {
    () => {
        if !$crate::lab::is_root() {
            eprintln!("skipped: needs root (network namespaces, AF_XDP, TAP); CI runs it as root");
            return;
        }
    };
}

/// Runs a command; panics with its output unless it succeeds.
pub(crate) fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `ip ARGS` (split on spaces).
pub(crate) fn ip(args: &str) {
    let mut v = vec!["ip"];
    v.extend(args.split_whitespace());
    run(&v);
}

/// A command in namespace `ns`; its output, whatever the exit status.
pub(crate) fn in_ns(ns: &str, args: &[&str]) -> Output {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    Command::new("ip").args(&v[1..]).output().unwrap_or_else(|e| panic!("running {v:?}: {e}"))
}

/// A command in namespace `ns` that must succeed; its stdout.
pub(crate) fn in_ns_ok(ns: &str, args: &[&str]) -> String {
    let out = in_ns(ns, args);
    assert!(
        out.status.success(),
        "in {ns}: {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for `cond`, at most `secs` seconds.
pub(crate) fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(secs), "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process the lab started.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

/// Namespaces and processes, removed on drop.
pub(crate) struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    pub(crate) procs: Vec<Proc>,
    pub(crate) dir: PathBuf,
}

impl Lab {
    /// A lab whose namespaces are `mp-<tag>-…` (leftovers of an earlier,
    /// killed run with the same tag are removed first).
    pub(crate) fn new(tag: &str) -> Lab {
        let prefix = format!("mp-{tag}-");
        let list = run(&["ip", "netns", "list"]);
        for line in String::from_utf8_lossy(&list.stdout).lines() {
            if let Some(name) = line.split_whitespace().next()
                && name.starts_with(&prefix)
            {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
        let dir = std::env::temp_dir().join(format!("meshplane-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the lab directory");
        Lab { prefix, namespaces: Vec::new(), procs: Vec::new(), dir }
    }

    /// Creates namespace `mp-<tag>-<name>` with loopback up; its full name.
    pub(crate) fn ns(&mut self, name: &str) -> String {
        let full = format!("{}{name}", self.prefix);
        ip(&format!("netns add {full}"));
        self.namespaces.push(full.clone());
        ip(&format!("-n {full} link set lo up"));
        full
    }

    /// Starts `args` in namespace `ns`, output to a log file; its index.
    pub(crate) fn spawn(&mut self, ns: &str, name: &str, args: &[&str]) -> usize {
        let log = self.dir.join(format!("{}-{name}.log", self.procs.len()));
        let f = std::fs::File::create(&log).expect("creating a log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log file"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {args:?} in {ns}: {e}"));
        self.procs.push(Proc { name: name.to_owned(), child, log });
        self.procs.len() - 1
    }

    /// A process's log so far.
    pub(crate) fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.procs[i].log).unwrap_or_default()
    }

    /// Sends `sig` (a name such as TERM or HUP) to process `i` by its pid.
    pub(crate) fn signal(&self, i: usize, sig: &str) {
        let pid = self.procs[i].child.id().to_string();
        let _ = Command::new("kill").args([&format!("-{sig}"), &pid]).status();
    }

    /// Stops process `i` with SIGTERM and waits (5 s, then SIGKILL); true
    /// if it exited successfully.
    pub(crate) fn stop(&mut self, i: usize) -> bool {
        self.signal(i, "TERM");
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.procs[i].child.try_wait() {
                return st.success();
            }
            if start.elapsed() > Duration::from_secs(5) {
                let _ = self.procs[i].child.kill();
                let _ = self.procs[i].child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while process `i` runs.
    pub(crate) fn running(&mut self, i: usize) -> bool {
        matches!(self.procs[i].child.try_wait(), Ok(None))
    }

    /// Starts server `args` (`args[2]` names it) in `ns` and waits until
    /// `ss SS_FLAGS` there shows it on `listen`'s port; its index.
    fn server(&mut self, ns: &str, ss_flags: &str, listen: &str, args: &[&str]) -> usize {
        let p = self.spawn(ns, args[2], args);
        let port = listen.rsplit(':').next().unwrap_or_default().to_owned();
        wait_for(&format!("{} to listen on {listen}", args[2]), 10, || {
            assert!(self.running(p), "{} exited: {}", args[2], self.log(p));
            String::from_utf8_lossy(&in_ns(ns, &["ss", ss_flags]).stdout).contains(&format!(":{port} "))
        });
        p
    }

    /// Runs a TCP transfer of `bytes` from `from` to a sink in `to`
    /// listening on `listen`, connecting to `connect`; the sink's answer
    /// line.
    pub(crate) fn tcp(&mut self, from: &str, to: &str, listen: &str, connect: &str, bytes: u64) -> String {
        let sink = self.server(to, "-ltn", listen, &[BIN, "tool", "tcp-sink", "--listen", listen, "--timeout", "20"]);
        let out = in_ns_ok(
            from,
            &[BIN, "tool", "tcp-source", "--connect", connect, "--bytes", &bytes.to_string(), "--timeout", "20"],
        );
        wait_for("the sink to finish", 10, || !self.running(sink));
        out.trim().to_owned()
    }

    /// `count` UDP datagrams echoed from a server in `to`, sent from `from`.
    pub(crate) fn udp(&mut self, from: &str, to: &str, listen: &str, connect: &str, count: u32) -> String {
        let echo = self.server(to, "-lun", listen, &[BIN, "tool", "udp-echo", "--listen", listen, "--idle", "20"]);
        let out = in_ns_ok(from, &[BIN, "tool", "udp-ping", "--connect", connect, "--count", &count.to_string()]);
        self.stop(echo);
        out.trim().to_owned()
    }
}

/// The address of task `id` in `task ls --format json`'s answer.
pub(crate) fn task_ip(tasks: &serde_json::Value, id: &str) -> String {
    tasks
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["id"] == id)
        .and_then(|t| t["ip"].as_str())
        .unwrap_or_else(|| panic!("no task {id} in {tasks}"))
        .to_owned()
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("MESHPLANE_E2E_KEEP").is_some() && std::thread::panicking() {
            eprintln!(
                "MESHPLANE_E2E_KEEP: leaving namespaces {:?} and {} for inspection",
                self.namespaces,
                self.dir.display()
            );
            return;
        }
        for i in 0..self.procs.len() {
            if self.running(i) {
                self.stop(i);
            }
        }
        if std::thread::panicking() {
            for p in &self.procs {
                eprintln!("--- log of {} ---\n{}", p.name, std::fs::read_to_string(&p.log).unwrap_or_default());
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
