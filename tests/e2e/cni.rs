//! Containers from real runtimes end to end (docs/cni-design.md §8, "End
//! to end"): podman, containerd's `ctr` and Docker run a busybox-static
//! rootfs whose httpd answers `NAME saw ADDR:PORT`, and meshplane makes
//! their interfaces (the plugin `meshplane-cni`, or `task attach --pid`).
//! Tests 4 and 5 run the plugin directly, as a runtime does.
//!
//! Each runtime runs with its own configuration and data under a short
//! work directory `/tmp/mpc.XXXX` (socket paths are limited to 108
//! bytes); nothing in /etc is written. What a runtime makes outside it
//! where it was missing (`/run/containerd`, `/run/docker`, `/run/runc`,
//! `/var/lib/cni`, its cgroups) is removed again if empty, and so are the
//! mount points the tests make. The recipes, as checked on Debian bookworm
//! (podman 4.3.1, runc 1.1.5, containerd 1.6.20, docker.io 20.10.24):
//! - podman: `CONTAINERS_CONF` (runc, cgroupfs, file events, `tmp_dir`,
//!   `network_backend = "cni"`, `cni_plugin_dirs` and
//!   `network_config_dir` in the work directory) and
//!   `CONTAINERS_STORAGE_CONF` (vfs, `graphroot`, `runroot`), then `podman
//!   run -d --network NET --rootfs DIR:O`. The plugin gets `CNI_NETNS=
//!   /run/netns/netns-<uuid>`, `CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=
//!   <name>` plus podman's own `CNI_ARGS`, and DEL (with the namespace and
//!   `prevResult`) on `podman rm`. The result's nameservers and search go
//!   first in the container's resolv.conf, the host's servers after them;
//!   its options are dropped. busybox as pid 1 ignores SIGTERM: `rm -f -t 0`.
//! - containerd: its own `--config` (root, state, grpc address, the `opt`
//!   plugin's path; the CRI plugin disabled). `ctr run --cni` reads
//!   `/etc/cni/net.d` and `/opt/cni/bin` only, so it runs in `unshare
//!   --mount --propagation private` with both bind-mounted from the work
//!   directory. ADD gets `CNI_NETNS=/proc/PID/ns/net` and the container id
//!   `<namespace>-<id>`, no `CNI_ARGS`; DEL (after `ctr task kill`) gets
//!   `CNI_NETNS=""`. The shims put their sockets in `/run/containerd/s`
//!   whatever the configuration says.
//! - Docker: `dockerd` with its own data root, exec root, pidfile and
//!   socket, no iptables, no bridge, vfs, cgroupfs. It writes
//!   `/etc/docker/key.json` (no flag moves it), so it runs in `unshare
//!   --mount --propagation private` with `/etc/docker` bind-mounted from
//!   the work directory. `/proc/PID/cgroup` shows `…:/docker/<64 hex>`.
//!   The containerd it starts makes `/opt/containerd` (removed again).
//!
//! The containers' httpd listens on 0.0.0.0:8080, so that `REMOTE_ADDR`
//! is `198.18.0.100`, not `[::ffff:198.18.0.100]`. A node runs under `ip
//! netns exec` (a slave mount namespace): a `/run/netns/netns-<uuid>`
//! podman makes after the node started is visible to it (the bind mount
//! propagates; `cni_runtimes_run_the_rootfs` checks it).

use crate::cluster::{LabGuard, text};
use crate::lab::BIN;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The CNI plugin (`src/bin/meshplane-cni.rs`); `None` while it is not
/// built, and then the tests that need it skip.
const PLUGIN: Option<&str> = option_env!("CARGO_BIN_EXE_meshplane-cni");

/// The lab's service for the containers: a VIP, two published ports.
const POD_SERVICE: [&str; 14] = [
    "service",
    "create",
    "--name",
    "pod",
    "--network",
    "app",
    "--vip-port",
    "8080",
    "--publish",
    "30090:8080",
    "--publish",
    "mode=preserve-source,30091:8080",
    "--scheduler",
    "rr",
];

/// Why a test cannot run here (not root, a program missing), if so.
fn missing(programs: &[&str]) -> Option<String> {
    if !crate::lab::is_root() {
        return Some("needs root (network namespaces, container runtimes); CI runs it as root".to_owned());
    }
    let lacking: Vec<&str> = programs.iter().copied().filter(|p| !on_path(p)).collect();
    if !lacking.is_empty() {
        return Some(format!("{} not installed (scripts/bootstrap installs them)", lacking.join(", ")));
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox missing (busybox-static; scripts/bootstrap installs it)".to_owned());
    }
    None
}

/// True if `program` is an executable on PATH (or a path that exists).
fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file())).unwrap_or(false)
}

/// Returns from the test with a message unless it can run: root, the
/// programs installed, and (`plugin`) the CNI plugin built.
macro_rules! need {
    ($($program:expr),* $(; $plugin:ident)?) => {
        if let Some(why) = missing(&[$($program),*]) {
            eprintln!("skipped: {why}");
            return;
        }
        $(
            let $plugin = match PLUGIN {
                Some(p) => p,
                None => {
                    eprintln!("skipped: the meshplane-cni binary is not built (src/bin/meshplane-cni.rs)");
                    return;
                }
            };
        )?
    };
}

// ---------------------------------------------------------------------------
// Commands with deadlines.

/// Reads `r` to its end on a thread; the bytes arrive on the channel.
fn drain(r: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut v);
        }
        let _ = tx.send(v);
    });
    rx
}

/// Runs `cmd` with `input` on its stdin, for at most `secs` seconds (then
/// it is killed, and its stderr says so). A daemon it leaves holding its
/// output (conmon, a shim) does not hold the test: the output is what
/// arrived within 2 s of its exit.
fn run_in(cmd: &mut Command, input: &[u8], secs: u64) -> Output {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_empty() { Stdio::null() } else { Stdio::piped() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let mut stdin = child.stdin.take();
    let input = input.to_vec();
    std::thread::spawn(move || {
        if let Some(w) = stdin.as_mut() {
            let _ = w.write_all(&input);
        }
    });
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut killed = false;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            killed = true;
            break child.wait().unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let grace = Duration::from_secs(2);
    let mut stderr = err.recv_timeout(grace).unwrap_or_default();
    if killed {
        stderr.extend_from_slice(format!("\n(killed after {secs} s)").as_bytes());
    }
    Output { status, stdout: out.recv_timeout(grace).unwrap_or_default(), stderr }
}

/// `run_in` with nothing on stdin.
fn run_for(cmd: &mut Command, secs: u64) -> Output {
    run_in(cmd, b"", secs)
}

/// `run_for` that must succeed; its stdout.
fn ok(cmd: &mut Command, secs: u64) -> String {
    let what = format!("{cmd:?}");
    let o = run_for(cmd, secs);
    assert!(o.status.success(), "{what} failed ({}):\n{}{}", o.status, text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

/// A command from its arguments.
fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    c
}

/// Polls `f` every 50 ms for at most `limit`; how long it took (panics
/// naming `what` at the limit).
fn within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

/// Sends signal `sig` (TERM, KILL) to `pid`: a process the test started,
/// or its runtime did for it.
fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([format!("-{sig}"), pid.to_string()]).output();
}

/// True while `pid` exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rfind(')').is_some_and(|i| !s[i + 1..].trim_start().starts_with('Z')))
}

/// Stops `child` (a daemon the test started): SIGTERM, then SIGKILL after
/// `secs`.
fn stop_child(child: &mut Child, secs: u64) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    kill(child.id(), "TERM");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A process the test started, killed (by its pid) when dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Live processes whose command line mentions a path in `dir` (never
/// this process): pid and command line.
fn leftovers(dir: &Path) -> Vec<(u32, String)> {
    let me = std::process::id();
    let needle = format!("{}/", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = String::from_utf8_lossy(&std::fs::read(p.path().join("cmdline")).ok()?).replace('\0', " ");
            (pid != me && cmdline.contains(&needle) && alive(pid)).then_some((pid, cmdline))
        })
        .collect()
}

/// Kills (SIGKILL) what a runtime left running from `dir`, a work
/// directory of this test's (conmon, a shim, a daemon's own containerd),
/// after 3 s for it to exit by itself.
fn kill_leftovers(dir: &Path) {
    let t0 = Instant::now();
    while !leftovers(dir).is_empty() && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (pid, cmdline) in leftovers(dir) {
        eprintln!("killing leftover process {pid}: {cmdline}");
        kill(pid, "KILL");
    }
}

/// Kills (SIGKILL) container processes the test knows by pid, if the pid
/// still names that container (its cgroup path has the id).
fn kill_containers(pids: &[(u32, String)]) {
    for (pid, id) in pids {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if !id.is_empty() && cgroup.contains(id.as_str()) && alive(*pid) {
            eprintln!("killing leftover container process {pid} ({id})");
            kill(*pid, "KILL");
        }
    }
}

// ---------------------------------------------------------------------------
// Directories.

/// The work directory `/tmp/mpc.XXXX`, removed when dropped (after
/// unmounting anything a runtime left mounted under it, and killing any
/// process left running from it). `MESHPLANE_E2E_KEEP` keeps it when a
/// test fails.
pub(crate) struct WorkDir(pub(crate) PathBuf);

impl WorkDir {
    pub(crate) fn new() -> WorkDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let mut seed = u64::from(nanos) ^ (u64::from(std::process::id()) << 32);
        for _ in 0..100 {
            const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
            let tag: String = (0..4)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    CHARS[usize::try_from((seed >> 33) % 36).unwrap_or(0)] as char
                })
                .collect();
            let dir = PathBuf::from(format!("/tmp/mpc.{tag}"));
            if std::fs::create_dir(&dir).is_ok() {
                return WorkDir(dir);
            }
        }
        panic!("could not make a /tmp/mpc.XXXX directory");
    }

    /// A path in it.
    pub(crate) fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// A path in it, as a string.
    pub(crate) fn s(&self, p: &str) -> String {
        self.0.join(p).to_string_lossy().into_owned()
    }
}

/// Mount points under `dir` in this mount namespace, deepest first.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.len()));
    v
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("MESHPLANE_E2E_KEEP").is_some() && std::thread::panicking() {
            eprintln!("MESHPLANE_E2E_KEEP: leaving {}", self.0.display());
            return;
        }
        kill_leftovers(&self.0);
        for m in mounts_under(&self.0) {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

/// Removes `p` and the directories under it, if they hold nothing else
/// (a file anywhere keeps it and its parents). Cgroup directories go too
/// when they have no processes (their control files do not count).
fn remove_empty_tree(p: &Path) {
    if let Ok(entries) = std::fs::read_dir(p) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}

/// Directories outside the work directory that a runtime (or the test,
/// for its mount points) makes where they were missing: each removed
/// when dropped if it is empty again, deepest first.
struct MadeDirs(Vec<PathBuf>);

impl MadeDirs {
    /// Notes which of `paths` (and their ancestors) are missing now.
    fn watch(paths: &[&str]) -> MadeDirs {
        let mut v = Vec::new();
        for p in paths {
            let mut p = PathBuf::from(p);
            // The topmost missing ancestor covers the rest.
            let mut top = None;
            while !p.exists() {
                top = Some(p.clone());
                if !p.pop() {
                    break;
                }
            }
            if let Some(t) = top
                && !v.contains(&t)
            {
                v.push(t);
            }
        }
        MadeDirs(v)
    }

    /// `watch`, then makes `paths`.
    fn make(paths: &[&str]) -> MadeDirs {
        let made = MadeDirs::watch(paths);
        for p in paths {
            std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("making {p}: {e}"));
        }
        made
    }

    /// Also watches the cgroup `name` under every v1 controller (and the
    /// unified hierarchy).
    fn cgroups(mut self, name: &str) -> MadeDirs {
        if let Ok(ctls) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in ctls.flatten() {
                let p = c.path().join(name);
                if c.path().is_dir() && !p.exists() {
                    self.0.push(p);
                }
            }
        }
        let top = Path::new("/sys/fs/cgroup").join(name);
        if !top.exists() && !self.0.contains(&top) {
            self.0.push(top);
        }
        self
    }
}

impl Drop for MadeDirs {
    fn drop(&mut self) {
        let mut v = self.0.clone();
        v.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in v {
            remove_empty_tree(&p);
            if p.exists() {
                eprintln!("left {} (not empty)", p.display());
            }
        }
    }
}

/// The container image as a directory (docs/cni-design.md §8): busybox,
/// its applets, and a CGI that answers `NAME saw ADDR:PORT`.
pub(crate) fn rootfs(dir: &Path) {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "www/cgi-bin"] {
        std::fs::create_dir_all(dir.join(d)).expect("making the rootfs");
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("copying /bin/busybox");
    for a in ["sh", "httpd", "wget", "nslookup", "cat", "ip"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).expect("linking an applet");
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("writing passwd");
    let cgi = dir.join("www/cgi-bin/index.cgi");
    let script = concat!(
        "#!/bin/sh\n",
        r#"printf "Content-Type: text/plain\r\n\r\n%s saw %s:%s\n" "$(cat /tmp/name)" "$REMOTE_ADDR" "$REMOTE_PORT""#,
        "\n"
    );
    std::fs::write(&cgi, script).expect("writing the CGI");
    let mut perm = std::fs::metadata(&cgi).expect("cgi").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&cgi, perm).expect("chmod the CGI");
}

/// A copy of rootfs `from` at `to` (`cp -a`: links kept).
fn copy_rootfs(from: &Path, to: &Path) {
    ok(&mut cmd(&["cp", "-a", &from.to_string_lossy(), &to.to_string_lossy()]), 30);
}

/// The container's command: its name in /tmp/name, then httpd on
/// 0.0.0.0:8080 (IPv4 only, so that REMOTE_ADDR is `198.18.0.100`, not
/// `[::ffff:198.18.0.100]`).
fn httpd(name: &str) -> String {
    format!("echo {name} > /tmp/name; exec httpd -f -p 0.0.0.0:8080 -h /www")
}

/// GET http://127.0.0.1:8080/ inside the network namespace of `pid`,
/// with the host's busybox (10 s at most; its `wget -T` crashes): the
/// body.
fn get_in(pid: u32) -> String {
    let ns = format!("--net=/proc/{pid}/ns/net");
    ok(&mut cmd(&["nsenter", &ns, "busybox", "wget", "-qO-", "http://127.0.0.1:8080/"]), 10)
}

/// A shell plugin of type `mpfake` in `dir/cni/bin`: it logs each call's
/// `CNI_*` variables and stdin to `dir/fake.log`, raises `lo` in the
/// namespace on ADD and answers a valid 1.0.0 result (with DNS).
fn fake_plugin(w: &WorkDir) {
    let log = w.s("fake.log");
    let script = format!(
        r#"#!/bin/sh
IN=$(cat)
{{ echo "=== $CNI_COMMAND"; env | grep '^CNI_' | sort; echo "STDIN: $IN"; }} >> {log}
case "$CNI_COMMAND" in
VERSION) echo '{{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}}';;
ADD)
  [ -n "$CNI_NETNS" ] && nsenter --net="$CNI_NETNS" ip link set lo up
  echo '{{"cniVersion":"1.0.0","interfaces":[{{"name":"'$CNI_IFNAME'","mac":"02:42:c6:13:00:05","sandbox":"'$CNI_NETNS'"}}],"ips":[{{"address":"198.19.0.5/24","gateway":"198.19.0.254","interface":0}}],"dns":{{"nameservers":["198.19.0.254"],"search":["example.com"],"options":["ndots:0"]}}}}';;
esac
exit 0
"#
    );
    let p = w.join("cni/bin/mpfake");
    std::fs::create_dir_all(w.join("cni/bin")).expect("cni/bin");
    std::fs::write(&p, script).expect("writing the fake plugin");
    let mut perm = std::fs::metadata(&p).expect("fake plugin").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&p, perm).expect("chmod the fake plugin");
}

/// The fake plugin's log: one `(command, lines)` per call.
fn fake_calls(w: &WorkDir) -> Vec<(String, String)> {
    let log = std::fs::read_to_string(w.join("fake.log")).unwrap_or_default();
    log.split("=== ")
        .filter(|c| !c.is_empty())
        .map(|c| {
            let (cmd, rest) = c.split_once('\n').unwrap_or((c, ""));
            (cmd.trim().to_owned(), rest.to_owned())
        })
        .collect()
}

// ---------------------------------------------------------------------------
// podman.

/// podman with its own configuration and storage in the work directory
/// (`W/containers.conf`, `W/storage.conf`, CNI directories `W/cni/bin`
/// and `W/cni/net.d`). Dropping it removes every container of that
/// storage (all are the test's).
pub(crate) struct Podman {
    w: PathBuf,
    /// Container processes, by pid and id (killed if `rm` left them).
    pids: std::cell::RefCell<Vec<(u32, String)>>,
    _made: MadeDirs,
}

impl Podman {
    pub(crate) fn new(w: &WorkDir) -> Podman {
        let made = MadeDirs::watch(&["/run/runc", "/var/lib/cni/results", "/run/mount"]).cgroups("libpod_parent");
        for d in ["cni/bin", "cni/net.d", "tmp", "storage", "run"] {
            std::fs::create_dir_all(w.join(d)).expect("podman directories");
        }
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}"]
network_config_dir = "{netd}"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
tmp_dir = "{tmp}"
"#,
            bin = w.s("cni/bin"),
            netd = w.s("cni/net.d"),
            events = w.s("events.log"),
            tmp = w.s("tmp"),
        );
        std::fs::write(w.join("containers.conf"), conf).expect("writing containers.conf");
        let storage =
            format!("[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n", w.s("storage"), w.s("run"));
        std::fs::write(w.join("storage.conf"), storage).expect("writing storage.conf");
        Podman { w: w.0.clone(), pids: Default::default(), _made: made }
    }

    /// `podman ARGS` with this configuration (and no `CNI_ARGS`).
    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.args(args)
            .env("CONTAINERS_CONF", self.w.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.w.join("storage.conf"))
            .env_remove("CNI_ARGS");
        c
    }

    /// `podman ARGS`, which must succeed within 60 s; its stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        ok(&mut self.cmd(args), 60)
    }

    /// Runs container `name` (detached) on `network` from `rootfs` (an
    /// overlay on it), serving `who`, with `cni_args` in podman's
    /// environment; its id.
    pub(crate) fn run(&self, name: &str, network: &str, rootfs: &Path, who: &str, cni_args: Option<&str>) -> String {
        let root = format!("{}:O", rootfs.display());
        let script = httpd(who);
        let mut c = self.cmd(&["run", "-d", "--name", name, "--network", network, "--rootfs", &root]);
        c.args(["/bin/sh", "-c", &script]);
        if let Some(a) = cni_args {
            c.env("CNI_ARGS", a);
        }
        let id = ok(&mut c, 60).trim().to_owned();
        let pid = self.pid(name);
        self.pids.borrow_mut().push((pid, id.clone()));
        id
    }

    /// The pid of container `name`'s process.
    pub(crate) fn pid(&self, name: &str) -> u32 {
        let out = self.ok(&["inspect", "-f", "{{.State.Pid}}", name]);
        out.trim().parse().unwrap_or_else(|_| panic!("podman inspect pid of {name}: {out:?}"))
    }

    /// The addresses podman recorded from the CNI result, `NET=IP/LEN`.
    pub(crate) fn addresses(&self, name: &str) -> String {
        let f = "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}={{$v.IPAddress}}/{{$v.IPPrefixLen}} {{end}}";
        self.ok(&["inspect", "-f", f, name])
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let o = run_for(&mut self.cmd(&["rm", "-a", "-f", "-t", "0"]), 60);
        if !o.status.success() {
            eprintln!("podman rm -a: {}{}", text(&o.stdout), text(&o.stderr));
        }
        kill_containers(&self.pids.borrow());
        kill_leftovers(&self.w);
    }
}

// ---------------------------------------------------------------------------
// containerd.

/// A containerd daemon of the test's own (`W/ctrd.toml`: root, state and
/// socket under `W/c`), stopped by its pid when dropped, after every task
/// and container of namespace `mp` is removed.
pub(crate) struct Containerd {
    w: PathBuf,
    sock: String,
    child: Option<Child>,
    _made: MadeDirs,
}

/// Waits (at most `secs`) until daemon `what` (its process `child`, its
/// log `log`) answers on socket `sock` (`probe` succeeds, each run
/// bounded), failing at once if it exits; prints how long it took.
fn wait_daemon(what: &str, child: &mut Option<Child>, sock: &str, log: &Path, secs: u64, mut probe: Command) {
    let t0 = Instant::now();
    within(&format!("{what}'s socket"), Duration::from_secs(secs), || {
        let running = child.as_mut().is_some_and(|ch| matches!(ch.try_wait(), Ok(None)));
        assert!(running, "{what} exited:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        Path::new(sock).exists() && run_for(&mut probe, secs.min(10)).status.success()
    });
    eprintln!("{what} answered in {:.2} s", t0.elapsed().as_secs_f64());
}

impl Containerd {
    pub(crate) fn start(w: &WorkDir) -> Containerd {
        let made = MadeDirs::watch(&["/run/containerd", "/var/lib/cni/results", "/run/mount"]).cgroups("mp");
        std::fs::create_dir_all(w.join("c")).expect("W/c");
        let sock = w.s("c/c.sock");
        let conf = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = w.s("c/root"),
            state = w.s("c/state"),
            opt = w.s("c/opt"),
        );
        std::fs::write(w.join("ctrd.toml"), conf).expect("writing ctrd.toml");
        let log = std::fs::File::create(w.join("c/log")).expect("containerd's log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(w.join("ctrd.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let mut c = Containerd { w: w.0.clone(), sock, child: Some(child), _made: made };
        let probe = ctr(&c.sock, &["version"]);
        wait_daemon("containerd", &mut c.child, &c.sock, &w.join("c/log"), 15, probe);
        c
    }

    /// `ctr --address SOCK --namespace mp ARGS`.
    pub(crate) fn ctr(&self, args: &[&str]) -> Command {
        ctr(&self.sock, args)
    }

    /// Task ids and pids of namespace `mp` (`ctr task ls`).
    pub(crate) fn tasks(&self) -> Vec<(String, u32, String)> {
        let out = run_for(&mut self.ctr(&["task", "ls"]), 10);
        text(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.first()?.to_string(), f.get(1)?.parse().ok()?, f.get(2)?.to_string()))
            })
            .collect()
    }

    /// `ctr run --cni --rm --rootfs ROOTFS ID` serving `who`, in the
    /// foreground of a background child (so that its DEL runs when the task
    /// ends), in a private mount namespace where `/etc/cni/net.d` is
    /// `netd` and `/opt/cni/bin` is `bin` (the caller made both mount
    /// points: `ctr_mount_points`).
    pub(crate) fn run_cni(&self, id: &str, rootfs: &Path, netd: &Path, bin: &Path, who: &str) -> CtrRun {
        let inner = format!(
            "mount --bind '{netd}' /etc/cni/net.d && mount --bind '{bin}' /opt/cni/bin && exec ctr --address '{sock}' --namespace mp run --cni --rm --rootfs '{root}' {id} /bin/sh -c '{script}'",
            netd = netd.display(),
            bin = bin.display(),
            sock = self.sock,
            root = rootfs.display(),
            script = httpd(who),
        );
        let log_path = self.w.join(format!("ctr-{id}.log"));
        let log = std::fs::File::create(&log_path).expect("ctr's log");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c", &inner])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting ctr run");
        let mut r = CtrRun { child: Some(child), id: id.to_owned(), sock: self.sock.clone(), log: log_path };
        within(&format!("ctr task {id} running"), Duration::from_secs(20), || {
            assert!(r.running(), "ctr run {id} exited:\n{}", r.log());
            self.tasks().iter().any(|(t, _, st)| t == id && st == "RUNNING")
        });
        r
    }
}

/// `ctr --address SOCK --namespace mp ARGS`.
fn ctr(sock: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ctr");
    c.args(["--address", sock, "--namespace", "mp"]).args(args);
    c
}

/// The two mount points `ctr run --cni` needs, made if missing (and
/// removed again when dropped).
fn ctr_mount_points() -> MadeDirs {
    MadeDirs::make(&["/etc/cni/net.d", "/opt/cni/bin"])
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let tasks = self.tasks();
        for (id, _, _) in &tasks {
            let _ = run_for(&mut self.ctr(&["task", "kill", "-s", "KILL", id]), 10);
        }
        let t0 = Instant::now();
        while self.tasks().iter().any(|(_, _, st)| st == "RUNNING") && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for (id, _, _) in &tasks {
            let _ = run_for(&mut self.ctr(&["task", "rm", "-f", id]), 10);
        }
        let cs = run_for(&mut self.ctr(&["containers", "ls", "-q"]), 10);
        for id in text(&cs.stdout).lines() {
            let _ = run_for(&mut self.ctr(&["containers", "rm", id.trim()]), 10);
        }
        kill_containers(&tasks.iter().map(|(id, pid, _)| (*pid, id.clone())).collect::<Vec<_>>());
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, 5);
        }
        kill_leftovers(&self.w);
    }
}

/// A `ctr run` in the foreground, as a child of the test: killed (its
/// task first, through containerd) when dropped.
pub(crate) struct CtrRun {
    child: Option<Child>,
    id: String,
    sock: String,
    log: PathBuf,
}

impl CtrRun {
    pub(crate) fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// What it printed.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CtrRun {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        if matches!(c.try_wait(), Ok(None)) {
            let _ = run_for(&mut ctr(&self.sock, &["task", "kill", "-s", "KILL", &self.id]), 10);
            let t0 = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

// ---------------------------------------------------------------------------
// Docker.

/// The Docker client: the daemon's own version (Debian's, 20.10) if it is
/// there, else whatever `docker` is on PATH (it negotiates the API).
fn docker_client() -> &'static str {
    if Path::new("/usr/bin/docker").exists() { "/usr/bin/docker" } else { "docker" }
}

/// A dockerd of the test's own (data root, exec root, pidfile and socket
/// under `W/d`; no iptables, no bridge, vfs, cgroupfs), in a private mount
/// namespace with `/etc/docker` from `W/d/etc` (it writes its key.json
/// there). Dropping it removes every container, then stops it by pid.
pub(crate) struct Dockerd {
    w: PathBuf,
    sock: String,
    child: Option<Child>,
    pids: std::cell::RefCell<Vec<(u32, String)>>,
    _made: MadeDirs,
}

impl Dockerd {
    pub(crate) fn start(w: &WorkDir) -> Dockerd {
        let mut made = MadeDirs::make(&["/etc/docker"]);
        let mut more =
            MadeDirs::watch(&["/run/docker", "/run/containerd", "/run/mount", "/opt/containerd"]).cgroups("docker");
        made.0.append(&mut more.0);
        for d in ["d/etc", "d/data", "d/x"] {
            std::fs::create_dir_all(w.join(d)).expect("W/d");
        }
        std::fs::write(w.join("d/daemon.json"), "{}\n").expect("daemon.json");
        let sock = w.s("d/d.sock");
        let inner = format!(
            "mount --bind '{etc}' /etc/docker && exec dockerd --data-root '{data}' --exec-root '{x}' --pidfile '{pid}' -H 'unix://{sock}' --config-file '{conf}' --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none --storage-driver=vfs --exec-opt native.cgroupdriver=cgroupfs",
            etc = w.s("d/etc"),
            data = w.s("d/data"),
            x = w.s("d/x"),
            pid = w.s("d/pid"),
            conf = w.s("d/daemon.json"),
        );
        let log = std::fs::File::create(w.join("d/log")).expect("dockerd's log");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c", &inner])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        let mut d = Dockerd { w: w.0.clone(), sock, child: Some(child), pids: Default::default(), _made: made };
        let probe = d.cmd(&["version"]);
        wait_daemon("dockerd", &mut d.child, &d.sock, &w.join("d/log"), 30, probe);
        d
    }

    /// `docker -H unix://SOCK ARGS`.
    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(docker_client());
        c.arg("-H").arg(format!("unix://{}", self.sock)).args(args);
        c
    }

    /// `docker ARGS`, which must succeed within 60 s; its stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        ok(&mut self.cmd(args), 60)
    }

    /// `docker import` of the rootfs directory as `mp-busybox:local`.
    pub(crate) fn import(&self, rootfs: &Path) {
        let tar = Command::new("tar").arg("-C").arg(rootfs).args(["-c", "."]).output().expect("tar of the rootfs");
        assert!(tar.status.success(), "tar: {}", text(&tar.stderr));
        let o = run_in(&mut self.cmd(&["import", "-", "mp-busybox:local"]), &tar.stdout, 60);
        assert!(o.status.success(), "docker import: {}{}", text(&o.stdout), text(&o.stderr));
    }

    /// `docker run -d --network none --name NAME mp-busybox:local` serving
    /// `who`; its id and pid.
    pub(crate) fn run(&self, name: &str, who: &str) -> (String, u32) {
        let script = httpd(who);
        let id = self
            .ok(&["run", "-d", "--network", "none", "--name", name, "mp-busybox:local", "/bin/sh", "-c", &script])
            .trim()
            .to_owned();
        let pid = self.pid(name);
        self.pids.borrow_mut().push((pid, id.clone()));
        (id, pid)
    }

    /// `docker inspect -f '{{.State.Pid}}' NAME`.
    pub(crate) fn pid(&self, name: &str) -> u32 {
        let out = self.ok(&["inspect", "-f", "{{.State.Pid}}", name]);
        out.trim().parse().unwrap_or_else(|_| panic!("docker inspect pid of {name}: {out:?}"))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ps = run_for(&mut self.cmd(&["ps", "-aq"]), 10);
        let ids: Vec<String> =
            text(&ps.stdout).lines().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect();
        if !ids.is_empty() {
            let mut c = self.cmd(&["rm", "-f"]);
            c.args(&ids);
            let _ = run_for(&mut c, 60);
        }
        kill_containers(&self.pids.borrow());
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, 15);
        }
        kill_leftovers(&self.w);
    }
}

// ---------------------------------------------------------------------------
// The lab and the plugin.

/// A network namespace `mp-cni-…` of the test's, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ok(&mut cmd(&["ip", "netns", "add", name]), 10);
        Netns(name.to_owned())
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    /// Its links (`ip -o link`), one a line.
    fn links(&self) -> Vec<String> {
        let o = run_for(&mut cmd(&["ip", "-n", &self.0, "-o", "link", "show"]), 10);
        text(&o.stdout).lines().map(str::to_owned).collect()
    }

    /// True if it has only its loopback.
    fn only_lo(&self) -> bool {
        let l = self.links();
        l.len() == 1 && l[0].contains(": lo:")
    }

    /// The interface index of `dev` (None if it has none).
    fn ifindex(&self, dev: &str) -> Option<u32> {
        let o = run_for(&mut cmd(&["ip", "-n", &self.0, "-o", "link", "show", "dev", dev]), 10);
        text(&o.stdout).split(':').next()?.trim().parse().ok()
    }

    /// Its IPv4 addresses on `dev`.
    fn addrs(&self, dev: &str) -> String {
        text(&run_for(&mut cmd(&["ip", "-n", &self.0, "-4", "-o", "addr", "show", "dev", dev]), 10).stdout)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The lab (`lab up --io IO`) in a directory of its own, taken down when
/// dropped.
fn lab_up(tag: &str, io: &str) -> LabGuard {
    let dir = std::env::temp_dir().join(format!("meshplane-e2e-{tag}-{}-{io}", std::process::id()));
    let g = LabGuard(dir);
    let _ = g.lab(&["down"]);
    let up = g.lab(&["up", "--io", io]);
    assert!(up.status.success(), "lab up: {}{}", text(&up.stdout), text(&up.stderr));
    g
}

/// Node `n`'s admin socket.
fn socket(g: &LabGuard, n: u8) -> String {
    g.0.join(format!("node{n}/admin.sock")).to_string_lossy().into_owned()
}

/// `task ls --format json` on node `n`.
fn tasks(g: &LabGuard, n: u8) -> Vec<Value> {
    let v: Value = serde_json::from_str(&g.cli_ok(n, &["task", "ls", "--format", "json"])).expect("task ls json");
    v.as_array().cloned().unwrap_or_default()
}

/// The tasks of `service` (from node `n`).
fn tasks_of(g: &LabGuard, n: u8, service: &str) -> Vec<Value> {
    tasks(g, n).into_iter().filter(|t| t["service"] == service).collect()
}

/// The task whose container id is `id`, if any.
fn task_of_container(g: &LabGuard, n: u8, id: &str) -> Option<Value> {
    tasks(g, n).into_iter().find(|t| t["container"]["id"] == id)
}

/// Sorted task ids (from node `n`).
fn task_ids(g: &LabGuard, n: u8) -> Vec<String> {
    let mut v: Vec<String> = tasks(g, n).iter().filter_map(|t| t["id"].as_str().map(str::to_owned)).collect();
    v.sort();
    v
}

/// Backend addresses of `service` (weight > 0) in node `n`'s tables.
fn backends(g: &LabGuard, n: u8, service: &str) -> Vec<String> {
    let o = g.cli(n, &["lb", "ls", "--format", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v["tables"]["service"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["backend"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["weight"].as_u64() != Some(0))
        .filter_map(|b| b["ip"].as_str().map(str::to_owned))
        .collect()
}

/// Host ends of task ports (`mpt…`) in node `n`'s namespace.
fn host_ports(n: u8) -> Vec<String> {
    let o = run_for(&mut cmd(&["ip", "-n", &format!("mp-lab-n{n}"), "-o", "link", "show"]), 10);
    text(&o.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("mpt"))
        .collect()
}

/// Who answered `count` requests from the client through `node`:`port`
/// (every one must be answered): the first word of each body.
fn answered(node: u8, port: u16, count: usize) -> std::collections::BTreeSet<String> {
    (0..count)
        .map(|_| {
            let body = crate::cluster::get(node, port)
                .unwrap_or_else(|e| panic!("a request through node{node}:{port} failed: {e}"));
            body.split(' ').next().unwrap_or_default().to_owned()
        })
        .collect()
}

fn names(v: &[&str]) -> std::collections::BTreeSet<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// What the plugin answered: its exit code, stdout as JSON (Null if
/// empty), stderr.
struct Answer {
    code: Option<i32>,
    json: Value,
    out: String,
    err: String,
}

impl Answer {
    /// Asserts a CNI error object with `code` whose `msg` or `details`
    /// says `phrase`.
    fn refused(&self, what: &str, code: u64, phrase: &str) {
        assert_ne!(self.code, Some(0), "{what}: succeeded: {}{}", self.out, self.err);
        assert_eq!(self.json["code"].as_u64(), Some(code), "{what}: {}{}", self.out, self.err);
        let said =
            format!("{} {}", self.json["msg"].as_str().unwrap_or(""), self.json["details"].as_str().unwrap_or(""));
        assert!(said.contains(phrase), "{what}: {said:?} does not say {phrase:?}");
    }

    /// Asserts success.
    fn ok(&self, what: &str) {
        assert_eq!(self.code, Some(0), "{what}: {}{}", self.out, self.err);
    }
}

/// Runs the installed plugin `bin/meshplane` as a runtime does: `env`
/// (CNI_* and CNI_PATH=bin), `conf` on stdin, 30 s at most.
fn plugin(bin: &Path, env: &[(&str, &str)], conf: &str) -> Answer {
    let mut c = Command::new(bin.join("meshplane"));
    c.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").env("CNI_PATH", bin);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = run_in(&mut c, conf.as_bytes(), 30);
    let out = text(&o.stdout);
    Answer {
        code: o.status.code(),
        json: if out.trim().is_empty() { Value::Null } else { serde_json::from_str(&out).unwrap_or(Value::Null) },
        out,
        err: text(&o.stderr),
    }
}

/// A network configuration as a runtime passes it to the plugin.
fn netconf(version: &str, network: &str, service: Option<&str>, socket: &str, extra: Value) -> String {
    let mut v = json!({ "cniVersion": version, "name": network, "type": "meshplane", "socket": socket });
    if let Some(s) = service {
        v["service"] = json!(s);
    }
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            m.insert(k.clone(), x.clone());
        }
    }
    v.to_string()
}

/// ADD of container `id` into `netns` as eth0.
fn add(bin: &Path, id: &str, netns: &str, conf: &str) -> Answer {
    plugin(bin, &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", id), ("CNI_NETNS", netns), ("CNI_IFNAME", "eth0")], conf)
}

/// DEL of container `id`'s eth0 (no namespace, as `ctr` sends it).
fn del(bin: &Path, id: &str, conf: &str) -> Answer {
    plugin(bin, &[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", id), ("CNI_NETNS", ""), ("CNI_IFNAME", "eth0")], conf)
}

/// `meshplane cni install` of the plugin into `bin` (and with `network`
/// a conflist into `netd`), for `service` on node `n`'s socket.
fn cni_install(plugin: &str, bin: &Path, netd: &Path, net: Option<(&str, &str, &str)>, extra: &[&str]) {
    let mut c = Command::new(BIN);
    c.args(["cni", "install", "--plugin", plugin, "--bin-dir"]).arg(bin).arg("--conf-dir").arg(netd);
    if let Some((network, service, socket)) = net {
        c.args(["--network", network, "--service", service, "--socket", socket]);
    }
    c.args(extra);
    ok(&mut c, 30);
}

// ---------------------------------------------------------------------------
// The runtimes alone (no meshplane): the plumbing above works here.

/// Each runtime runs the rootfs with its own directories, the httpd
/// answers, and the CNI calls are what the design says (with a fake
/// plugin): podman `CNI_NETNS=/run/netns/netns-…` and its `CNI_ARGS`, DEL
/// on `rm`, the result's DNS in resolv.conf; ctr `/proc/PID/ns/net` on ADD
/// and an empty one on DEL; Docker's container id in its cgroup, its
/// namespace gone with it. Prints how long each takes to start a
/// container.
#[test]
fn cni_runtimes_run_the_rootfs() {
    need!("podman", "runc", "conmon", "containerd", "ctr", "dockerd", "unshare", "nsenter");
    let _g = crate::serial();
    let w = WorkDir::new();
    rootfs(&w.join("r"));
    fake_plugin(&w);

    // podman.
    {
        // A process in a slave mount namespace, as the lab's nodes are.
        let slave_ns = Netns::new("mp-cni-slave");
        let slave = Spawned(
            Command::new("ip")
                .args(["netns", "exec", &slave_ns.0, "sleep", "60"])
                .stdin(Stdio::null())
                .spawn()
                .expect("sleep in a namespace"),
        );
        let pm = Podman::new(&w);
        std::fs::write(
            w.join("cni/net.d/10-mpf.conflist"),
            r#"{"cniVersion":"1.0.0","name":"mpf","plugins":[{"type":"mpfake","service":"x"}]}"#,
        )
        .expect("conflist");
        let ls = pm.ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
        assert!(ls.lines().any(|l| l == "mpf mpfake"), "{ls}");
        let t0 = Instant::now();
        let id = pm.run("mp-smoke-pm", "mpf", &w.join("r"), "pm-1", Some("MESHPLANE_SERVICE=x"));
        eprintln!("podman run: {:.2} s", t0.elapsed().as_secs_f64());
        let pid = pm.pid("mp-smoke-pm");
        assert!(get_in(pid).starts_with("pm-1 saw 127.0.0.1:"), "{}", get_in(pid));
        let calls = fake_calls(&w);
        let (_, a) = calls.iter().find(|(c, _)| c == "ADD").expect("an ADD");
        assert!(a.contains(&format!("CNI_CONTAINERID={id}\n")), "{a}");
        assert!(a.contains("CNI_NETNS=/run/netns/netns-"), "{a}");
        assert!(a.contains("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=mp-smoke-pm;MESHPLANE_SERVICE=x\n"), "{a}");
        assert_eq!(pm.addresses("mp-smoke-pm").trim(), "mpf=198.19.0.5/24");
        let resolv = pm.ok(&["exec", "mp-smoke-pm", "cat", "/etc/resolv.conf"]);
        let first_ns = resolv.lines().find(|l| l.starts_with("nameserver"));
        assert_eq!(first_ns, Some("nameserver 198.19.0.254"), "{resolv}");
        assert!(resolv.contains("search example.com"), "{resolv}");
        let netns = a.lines().find_map(|l| l.strip_prefix("CNI_NETNS=")).expect("CNI_NETNS").to_owned();
        // The namespace podman made after it started is visible to it.
        let target = slave.0.id().to_string();
        let seen = ok(&mut cmd(&["nsenter", "--target", &target, "--mount", "stat", "-L", "-c", "%i", &netns]), 10);
        let here = ok(&mut cmd(&["stat", "-L", "-c", "%i", &netns]), 10);
        assert_eq!(seen, here, "{netns} as seen from a slave mount namespace");
        let t0 = Instant::now();
        pm.ok(&["rm", "-f", "-t", "0", "mp-smoke-pm"]);
        eprintln!("podman rm: {:.2} s", t0.elapsed().as_secs_f64());
        let calls = fake_calls(&w);
        let (_, d) = calls.iter().find(|(c, _)| c == "DEL").expect("a DEL on podman rm");
        assert!(d.contains(&format!("CNI_NETNS={netns}\n")) && d.contains("prevResult"), "{d}");
        assert!(!Path::new(&netns).exists(), "{netns} is left");
    }
    let _ = std::fs::remove_file(w.join("fake.log"));

    // containerd.
    {
        let ctrd = Containerd::start(&w);
        let _mp = ctr_mount_points();
        std::fs::create_dir_all(w.join("ctr-n1/net.d")).expect("net.d");
        std::fs::write(
            w.join("ctr-n1/net.d/10-mpf.conflist"),
            r#"{"cniVersion":"1.0.0","name":"mpf","plugins":[{"type":"mpfake","service":"x"}]}"#,
        )
        .expect("conflist");
        copy_rootfs(&w.join("r"), &w.join("r1"));
        let t0 = Instant::now();
        let mut run = ctrd.run_cni("mp-smoke-ctr", &w.join("r1"), &w.join("ctr-n1/net.d"), &w.join("cni/bin"), "ctr-1");
        eprintln!("ctr run: {:.2} s", t0.elapsed().as_secs_f64());
        let pid = ctrd.tasks().iter().find(|t| t.0 == "mp-smoke-ctr").map(|t| t.1).expect("its pid");
        assert!(get_in(pid).starts_with("ctr-1 saw 127.0.0.1:"), "{}", get_in(pid));
        let calls = fake_calls(&w);
        let (_, a) = calls.iter().find(|(c, _)| c == "ADD").expect("an ADD");
        assert!(a.contains("CNI_CONTAINERID=mp-mp-smoke-ctr\n"), "{a}");
        assert!(a.contains(&format!("CNI_NETNS=/proc/{pid}/ns/net\n")), "{a}");
        assert!(a.contains("CNI_ARGS=\n"), "{a}");
        ok(&mut ctrd.ctr(&["task", "kill", "-s", "KILL", "mp-smoke-ctr"]), 10);
        let t = within("ctr run to exit", Duration::from_secs(15), || !run.running());
        eprintln!("ctr run exited {:.2} s after the kill", t.as_secs_f64());
        let calls = fake_calls(&w);
        let (_, d) = calls.iter().find(|(c, _)| c == "DEL").expect("a DEL after the kill");
        assert!(d.contains("CNI_NETNS=\n") && d.contains("CNI_CONTAINERID=mp-mp-smoke-ctr\n"), "{d}");
    }

    // Docker.
    {
        let key_before = Path::new("/etc/docker/key.json").exists();
        let dk = Dockerd::start(&w);
        dk.import(&w.join("r"));
        let t0 = Instant::now();
        let (id, pid) = dk.run("mp-smoke-dk", "dk-1");
        eprintln!("docker run: {:.2} s", t0.elapsed().as_secs_f64());
        assert!(get_in(pid).starts_with("dk-1 saw 127.0.0.1:"), "{}", get_in(pid));
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        assert!(cgroup.lines().any(|l| l.ends_with(&format!(":/docker/{id}"))), "{cgroup}");
        let links = dk.ok(&["exec", "mp-smoke-dk", "ip", "-o", "link"]);
        assert!(links.lines().count() == 1 && links.contains("lo:"), "{links}");
        dk.ok(&["rm", "-f", "mp-smoke-dk"]);
        within("the container's process gone", Duration::from_secs(5), || !alive(pid));
        assert!(w.join("d/etc/key.json").exists(), "dockerd wrote its key.json in the work directory");
        assert_eq!(Path::new("/etc/docker/key.json").exists(), key_before, "/etc/docker/key.json changed");
    }
}

// ---------------------------------------------------------------------------
// 1. podman.

/// Containers started by podman on the lab's three nodes are tasks of
/// `pod`: balanced through the published ports, by name through DNS,
/// gone from every balancer within a second of `podman rm`.
fn podman_containers_are_tasks(io: &str) {
    need!("podman", "runc", "conmon"; plugin_bin);
    let _g = crate::serial();
    let w = WorkDir::new();
    rootfs(&w.join("r"));
    let g = lab_up("cni-pm", io);
    g.cli_ok(1, &POD_SERVICE);
    #[rustfmt::skip]
    g.cli_ok(1, &["service", "create", "--name", "papi", "--network", "app", "--vip-port", "8080", "--target-port", "8080"]);
    let pm = Podman::new(&w);
    for n in 1..=3u8 {
        let (net, sock) = (format!("mp-pod-n{n}"), socket(&g, n));
        let conf = Some((net.as_str(), "pod", sock.as_str()));
        cni_install(plugin_bin, &w.join("cni/bin"), &w.join("cni/net.d"), conf, &["--services", "papi"]);
    }
    let ls = pm.ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    assert!(ls.lines().any(|l| l == "mp-pod-n1 meshplane"), "podman network ls: {ls}");
    let mut ids = Vec::new();
    for n in 1..=3u8 {
        let t0 = Instant::now();
        let id = pm.run(&format!("mp-pod-{n}"), &format!("mp-pod-n{n}"), &w.join("r"), &format!("pod-{n}"), None);
        eprintln!("podman run mp-pod-{n} (ADD included): {:.2} s", t0.elapsed().as_secs_f64());
        ids.push(id);
    }
    pm.run("mp-papi", "mp-pod-n2", &w.join("r"), "papi", Some("MESHPLANE_SERVICE=papi"));

    // Three tasks of pod, one per node, each recording its container.
    let pods = tasks_of(&g, 1, "pod");
    assert_eq!(pods.len(), 3, "{pods:?}");
    for (i, id) in ids.iter().enumerate() {
        let n = i + 1;
        let t = pods.iter().find(|t| t["container"]["id"] == id.as_str()).unwrap_or_else(|| panic!("{id}: {pods:?}"));
        assert_eq!(t["node"], format!("node{n}"), "{t}");
        assert_eq!(t["container"]["cni"]["network"], format!("mp-pod-n{n}"), "{t}");
        assert_eq!(t["container"]["name"], format!("mp-pod-{n}"), "{t}");
        let ip = t["ip"].as_str().expect("ip");
        let a = pm.addresses(&format!("mp-pod-{n}"));
        assert!(a.contains(&format!("mp-pod-n{n}={ip}/")), "podman recorded {a:?}, the task is {ip}");
    }
    assert_eq!(tasks_of(&g, 1, "papi").len(), 1, "MESHPLANE_SERVICE=papi made a task of papi");

    // Balanced through every node; preserve-source sees the client.
    for n in 1..=3 {
        assert_eq!(answered(n, 30090, 6), names(&["pod-1", "pod-2", "pod-3"]), "through node{n}");
    }
    let b = crate::cluster::get(1, 30091).expect("preserve-source");
    assert!(b.contains(" saw 198.18.0.100:"), "{b}");

    // By name through the node's DNS, and the result's DNS in resolv.conf.
    let resolv = pm.ok(&["exec", "mp-pod-1", "cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 198.19.0.254"), "{resolv}");
    let body = pm.ok(&["exec", "mp-pod-1", "wget", "-qO-", "http://papi:8080/"]);
    assert!(body.starts_with("papi saw 198.19.0."), "{body}");

    // podman rm: DEL detaches the task, at once.
    let pod2 = pods.iter().find(|t| t["container"]["id"] == ids[1].as_str()).expect("pod-2's task");
    let (ip2, task2) = (pod2["ip"].as_str().expect("ip").to_owned(), pod2["id"].as_str().expect("id").to_owned());
    let ports_before = host_ports(2);
    pm.ok(&["rm", "-f", "-t", "0", "mp-pod-2"]);
    let t = within("pod-2 out of every balancer, its task and port gone", Duration::from_secs(1), || {
        (1..=3).all(|n| !backends(&g, n, "pod").contains(&ip2))
            && !task_ids(&g, 1).contains(&task2)
            && (io != "afxdp" || host_ports(2).len() + 1 == ports_before.len())
    });
    eprintln!("podman rm: pod-2 gone everywhere {:.2} s after rm returned", t.as_secs_f64());
    for n in 1..=3 {
        assert_eq!(answered(n, 30090, 4), names(&["pod-1", "pod-3"]), "through node{n} after rm");
    }
}

#[test]
fn podman_containers_are_tasks_afxdp() {
    podman_containers_are_tasks("afxdp");
}

#[test]
fn podman_containers_are_tasks_tap() {
    podman_containers_are_tasks("tap");
}

// ---------------------------------------------------------------------------
// 2. containerd.

/// `ctr run --cni` on the three nodes: tasks of `pod`, balanced; the
/// task killed, ctr's DEL (no namespace) takes it out of every balancer
/// within a second.
#[test]
fn containerd_ctr_cni() {
    need!("containerd", "ctr", "runc", "unshare"; plugin_bin);
    let _g = crate::serial();
    let w = WorkDir::new();
    rootfs(&w.join("r"));
    let g = lab_up("cni-ctr", "afxdp");
    g.cli_ok(1, &POD_SERVICE);
    let ctrd = Containerd::start(&w);
    let _mount_points = ctr_mount_points();
    let mut runs = Vec::new();
    for n in 1..=3u8 {
        let netd = w.join(&format!("ctr-n{n}/net.d"));
        let (net, sock) = (format!("mp-pod-n{n}"), socket(&g, n));
        let conf = Some((net.as_str(), "pod", sock.as_str()));
        cni_install(plugin_bin, &w.join("cni/bin"), &netd, conf, &["--priority", "10"]);
        let root = w.join(&format!("r{n}"));
        copy_rootfs(&w.join("r"), &root);
        let t0 = Instant::now();
        runs.push(ctrd.run_cni(&format!("mp-ctr-{n}"), &root, &netd, &w.join("cni/bin"), &format!("ctr-{n}")));
        eprintln!("ctr run mp-ctr-{n} (ADD included): {:.2} s", t0.elapsed().as_secs_f64());
    }
    let pods = tasks_of(&g, 1, "pod");
    assert_eq!(pods.len(), 3, "{pods:?}");
    for n in 1..=3 {
        let t = pods
            .iter()
            .find(|t| t["container"]["id"] == format!("mp-mp-ctr-{n}"))
            .unwrap_or_else(|| panic!("no task of mp-mp-ctr-{n}: {pods:?}"));
        assert_eq!(t["node"], format!("node{n}"), "{t}");
    }
    for n in 1..=3 {
        assert_eq!(answered(n, 30090, 6), names(&["ctr-1", "ctr-2", "ctr-3"]), "through node{n}");
    }
    let b = crate::cluster::get(2, 30091).expect("preserve-source");
    assert!(b.contains(" saw 198.18.0.100:"), "{b}");

    let t2 = pods.iter().find(|t| t["container"]["id"] == "mp-mp-ctr-2").expect("ctr-2's task");
    let ip2 = t2["ip"].as_str().expect("ip").to_owned();
    ok(&mut ctrd.ctr(&["task", "kill", "-s", "KILL", "mp-ctr-2"]), 10);
    let run2 = &mut runs[1];
    within("ctr run mp-ctr-2 to exit (after its DEL)", Duration::from_secs(15), || !run2.running());
    let t = within("ctr-2 out of every balancer", Duration::from_secs(1), || {
        (1..=3).all(|n| !backends(&g, n, "pod").contains(&ip2))
    });
    eprintln!("ctr: ctr-2 gone everywhere {:.2} s after ctr run exited", t.as_secs_f64());
    let log = std::fs::read_to_string(g.0.join("node2.log")).unwrap_or_default();
    // ctr's DEL carries no namespace (`cni_runtimes_run_the_rootfs` shows
    // CNI_NETNS empty); the node found the task by the attachment alone.
    // Unless the reaper saw the killed container's namespace go first
    // (its scan can fall in the few ms between the kill and the DEL): then
    // the DEL finds nothing left to do, and says so.
    let t2_id = t2["id"].as_str().expect("id");
    let by_del = format!("cni del mp-mp-ctr-2/eth0 in network mp-pod-n2: task {t2_id} detached");
    let reaped = format!("task {t2_id}: container mp-mp-ctr-2's namespace");
    let del_after = "cni del mp-mp-ctr-2/eth0 in network mp-pod-n2: no task (done)";
    assert!(
        log.contains(&by_del) || (log.contains(&reaped) && log.contains(del_after)),
        "node2's log has neither {by_del:?} nor the reaper's detach and {del_after:?}:\n{log}"
    );
    if !log.contains(&by_del) {
        eprintln!("ctr: the reaper detached {t2_id} before ctr's DEL came");
    }
    assert_eq!(answered(1, 30090, 4), names(&["ctr-1", "ctr-3"]));
    drop(runs);
}

// ---------------------------------------------------------------------------
// 3. Docker.

/// A Docker container (`--network none`) attached by pid: a task whose
/// container is Docker's id, reachable through the routing mesh; reaped
/// when the container goes; another one detached by an id prefix.
#[test]
fn docker_attach_by_pid() {
    need!("dockerd", "containerd", "runc", "unshare", "tar");
    let _g = crate::serial();
    let w = WorkDir::new();
    rootfs(&w.join("r"));
    let g = lab_up("cni-dk", "afxdp");
    #[rustfmt::skip]
    g.cli_ok(1, &["service", "create", "--name", "dk", "--network", "app", "--target-port", "8080", "--publish", "30092:8080"]);
    let dk = Dockerd::start(&w);
    dk.import(&w.join("r"));
    let (id1, pid1) = dk.run("mp-dk1", "dk-1");
    let pid_arg = pid1.to_string();
    let out = g.cli_ok(1, &["task", "attach", "--service", "dk", "--pid", &pid_arg]);
    assert!(out.contains(&format!("(container {})", &id1[..12])), "task attach said: {out}");
    let t = task_of_container(&g, 1, &id1).unwrap_or_else(|| panic!("no task of {id1}: {:?}", tasks(&g, 1)));
    assert_eq!((t["service"].as_str(), t["node"].as_str()), (Some("dk"), Some("node1")), "{t}");
    let task1 = t["id"].as_str().expect("id").to_owned();
    let ls = g.cli_ok(1, &["task", "ls"]);
    assert!(ls.contains(&id1[..12]), "task ls shows the container: {ls}");
    for n in 1..=3 {
        let b = within(&format!("dk-1 through node{n}:30092"), Duration::from_secs(10), || {
            crate::cluster::get(n, 30092).is_ok_and(|b| b.starts_with("dk-1 saw "))
        });
        eprintln!("dk-1 answers through node{n} after {:.2} s", b.as_secs_f64());
    }

    // The container removed: the reaper detaches its task.
    dk.ok(&["rm", "-f", "mp-dk1"]);
    let t = within("dk-1's task reaped", Duration::from_secs(3), || !task_ids(&g, 1).contains(&task1));
    eprintln!("docker rm: task reaped within {:.2} s", t.as_secs_f64());

    // task detach --container PREFIX takes its eth0 away.
    let (id2, pid2) = dk.run("mp-dk2", "dk-2");
    let pid_arg = pid2.to_string();
    g.cli_ok(1, &["task", "attach", "--service", "dk", "--pid", &pid_arg]);
    let has_eth0 = || dk.ok(&["exec", "mp-dk2", "ip", "-o", "link"]).contains("eth0");
    within("dk-2's eth0", Duration::from_secs(10), has_eth0);
    let task2 = task_of_container(&g, 1, &id2).expect("dk-2's task")["id"].as_str().expect("id").to_owned();
    let out = g.cli_ok(1, &["task", "detach", "--container", &id2[..12]]);
    assert_eq!(out.trim(), task2, "task detach --container prints the task id");
    within("dk-2's eth0 gone", Duration::from_secs(5), || !has_eth0());
    assert!(!task_ids(&g, 1).contains(&task2));
}

// ---------------------------------------------------------------------------
// 4. Bad input.

/// For the tests that run the plugin directly, as a runtime does: a work
/// directory, the lab (AF_XDP) with service `pod`, and the plugin
/// installed in the work directory's `cni/bin` (returned).
fn direct(tag: &str, plugin_bin: &str) -> (WorkDir, LabGuard, PathBuf) {
    let w = WorkDir::new();
    let g = lab_up(tag, "afxdp");
    g.cli_ok(1, &POD_SERVICE);
    let bin = w.join("cni/bin");
    cni_install(plugin_bin, &bin, &w.join("cni/net.d"), None, &[]);
    (w, g, bin)
}

/// The plugin run directly with bad input: each case its CNI error code
/// and a message that says what is wrong, and nothing changed (no task,
/// the namespace as it was, no port on the node).
#[test]
fn cni_bad_input() {
    need!("ip"; plugin_bin);
    let _g = crate::serial();
    let (_w, g, bin) = direct("cni-bad", plugin_bin);
    let sock1 = socket(&g, 1);
    let good = netconf("1.0.0", "mp-bad", Some("pod"), &sock1, json!({}));
    let ns = Netns::new("mp-cni-bad");
    let before = (task_ids(&g, 1), host_ports(1));
    let unchanged = |what: &str| {
        assert_eq!(task_ids(&g, 1), before.0, "{what}: the tasks changed");
        assert!(ns.only_lo(), "{what}: {:?}", ns.links());
        assert_eq!(host_ports(1), before.1, "{what}: a port was left on node1");
    };

    let conf = netconf("1.0.0", "mp-bad", Some("nosuch"), &sock1, json!({}));
    add(&bin, "bad1", &ns.path(), &conf).refused("unknown service", 100, "does not exist");
    unchanged("unknown service");
    add(&bin, "bad1", &ns.path(), "{\"cniVersion\": \"1.0.0\",").refused("not JSON", 6, "not valid JSON");
    unchanged("not JSON");
    let conf = netconf("1.0.0", "mp-bad", None, &sock1, json!({}));
    add(&bin, "bad1", &ns.path(), &conf).refused("no service", 7, "names no service");
    unchanged("no service");
    let conf = netconf("0.3.1", "mp-bad", Some("pod"), &sock1, json!({}));
    add(&bin, "bad1", &ns.path(), &conf).refused("0.3.1", 1, "0.3.1 is not supported");
    let conf = netconf("1.0.0", "mp-bad", Some("pod"), &sock1, json!({ "ipam": { "type": "host-local" } }));
    add(&bin, "bad1", &ns.path(), &conf).refused("ipam", 2, "ipam");
    let a = plugin(&bin, &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "bad1"), ("CNI_NETNS", &ns.path())], &good);
    a.refused("no CNI_IFNAME", 4, "CNI_IFNAME");
    let a = plugin(
        &bin,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "bad1"),
            ("CNI_NETNS", &ns.path()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IP=198.19.0.9"),
        ],
        &good,
    );
    a.refused("IP=", 2, "remove --ip");
    unchanged("bad configurations");

    // Namespaces: gone, not one, with an eth0 already.
    {
        let gone = Netns::new("mp-cni-gone");
        let path = gone.path();
        drop(gone);
        add(&bin, "bad2", &path, &good).refused("a deleted namespace", 102, "gone");
    }
    add(&bin, "bad3", "/etc/hostname", &good).refused("not a namespace", 102, "not a network namespace");
    {
        let taken = Netns::new("mp-cni-eth0");
        ok(&mut cmd(&["ip", "-n", "mp-cni-eth0", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]), 10);
        add(&bin, "bad4", &taken.path(), &good).refused("eth0 taken", 103, "already exists");
        assert_eq!(taken.links().len(), 3, "lo, eth0 and its peer: {:?}", taken.links());
    }
    unchanged("bad namespaces");

    // A full network: 101 once no address is left (the tasks made until
    // then are deleted again).
    g.cli_ok(1, &["network", "create", "--subnet", "198.19.9.0/29", "tiny"]);
    g.cli_ok(1, &["service", "create", "--name", "tn", "--network", "tiny", "--target-port", "8080"]);
    let tiny = netconf("1.0.0", "mp-tiny", Some("tn"), &sock1, json!({}));
    let mut filled = Vec::new();
    let mut full = None;
    for k in 1..=8 {
        let ns = Netns::new(&format!("mp-cni-f{k}"));
        let a = add(&bin, &format!("fill{k}"), &ns.path(), &tiny);
        if a.code == Some(0) {
            filled.push(ns);
        } else {
            full = Some((a, ns));
            break;
        }
    }
    let (a, last) = full.expect("a /29 network took 8 tasks");
    a.refused("a full network", 101, "no free address");
    assert!(!filled.is_empty(), "not one task fitted in a /29");
    assert!(last.only_lo(), "{:?}", last.links());
    for k in 1..=filled.len() {
        del(&bin, &format!("fill{k}"), &tiny).ok("DEL of a filler");
    }
    drop(filled);

    // DEL of an unknown container, and twice.
    del(&bin, "never-added", &good).ok("DEL unknown");
    del(&bin, "never-added", &good).ok("DEL unknown again");

    // CHECK after ADD, and after the address is flushed.
    let okns = Netns::new("mp-cni-ok");
    let a = add(&bin, "good1", &okns.path(), &good);
    a.ok("ADD");
    let check_conf = netconf("1.0.0", "mp-bad", Some("pod"), &sock1, json!({ "prevResult": a.json }));
    let check = |what: &str| {
        plugin(
            &bin,
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "good1"),
                ("CNI_NETNS", &okns.path()),
                ("CNI_IFNAME", "eth0"),
            ],
            &check_conf,
        )
        .code
        .unwrap_or_else(|| panic!("{what}: killed"))
    };
    assert_eq!(check("CHECK after ADD"), 0);
    ok(&mut cmd(&["ip", "-n", "mp-cni-ok", "addr", "flush", "dev", "eth0"]), 10);
    let a = plugin(
        &bin,
        &[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "good1"), ("CNI_NETNS", &okns.path()), ("CNI_IFNAME", "eth0")],
        &check_conf,
    );
    a.refused("CHECK after a flush", 105, "no address");
    del(&bin, "good1", &good).ok("DEL good1");
    del(&bin, "good1", &good).ok("DEL good1 twice");

    // A service named with the most characters a name has (15): its task
    // id, SERVICE.N, is longer, and ADD takes it (it used to fail).
    g.cli_ok(1, &["service", "create", "--name", "fifteen-chars-x", "--network", "app", "--target-port", "8080"]);
    let long = netconf("1.0.0", "mp-long", Some("fifteen-chars-x"), &sock1, json!({}));
    let longns = Netns::new("mp-cni-long");
    add(&bin, "long1", &longns.path(), &long).ok("ADD for a 15-character service");
    let t = task_of_container(&g, 1, "long1").unwrap_or_else(|| panic!("no task of long1: {:?}", tasks(&g, 1)));
    assert_eq!(t["id"].as_str(), Some("fifteen-chars-x.1"), "{t}");
    assert!(!longns.only_lo(), "an eth0 in the namespace: {:?}", longns.links());
    del(&bin, "long1", &long).ok("DEL long1");
    within("long1's task deleted", Duration::from_secs(5), || task_of_container(&g, 1, "long1").is_none());

    // node3 down: ADD says so (11), STATUS too (50).
    let stop = g.lab(&["stop-node", "3"]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let sock3 = socket(&g, 3);
    let conf3 = netconf("1.0.0", "mp-bad3", Some("pod"), &sock3, json!({}));
    add(&bin, "bad5", &ns.path(), &conf3).refused("node down", 11, "not running");
    let status = netconf("1.1.0", "mp-bad3", Some("pod"), &sock3, json!({}));
    plugin(&bin, &[("CNI_COMMAND", "STATUS")], &status).refused("STATUS, node down", 50, "not running");
    assert!(ns.only_lo());
}

// ---------------------------------------------------------------------------
// 5. A node crash between ADD and DEL.

/// Containers added on node3, node3 killed: a DEL meanwhile is spooled and
/// done when it is back; the other ports are made again; GC detaches what
/// the runtime no longer knows (but no task without a container); a
/// namespace deleted is reaped.
#[test]
fn cni_survives_node_crash() {
    need!("ip"; plugin_bin);
    let _g = crate::serial();
    let (_w, g, bin) = direct("cni-crash", plugin_bin);
    let sock3 = socket(&g, 3);
    let conf = netconf("1.0.0", "mp-crash", Some("pod"), &sock3, json!({}));
    let nss: Vec<Netns> = (1..=3).map(|k| Netns::new(&format!("mp-cni-{k}"))).collect();
    let mut ips = Vec::new();
    for (k, ns) in nss.iter().enumerate() {
        let a = add(&bin, &format!("c{}", k + 1), &ns.path(), &conf);
        a.ok("ADD");
        let ip = a.json["ips"][0]["address"].as_str().expect("an address").to_owned();
        assert!(ns.addrs("eth0").contains(&ip), "{ip} not in {}: {}", ns.0, ns.addrs("eth0"));
        ips.push(ip);
    }
    let task_of = |c: &str| task_of_container(&g, 1, c).and_then(|t| t["id"].as_str().map(str::to_owned));
    let (t1, t2, t3) = (task_of("c1").expect("c1's task"), task_of("c2").expect("c2"), task_of("c3").expect("c3"));

    let c2_port = nss[1].ifindex("eth0");
    let stop = g.lab(&["stop-node", "3", "--kill"]);
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let a = del(&bin, "c1", &conf);
    a.ok("DEL with the node down");
    let spool = g.0.join("node3/cni-pending");
    let spooled = || std::fs::read_dir(&spool).map(|d| d.flatten().count()).unwrap_or(0);
    assert_eq!(spooled(), 1, "one pending DEL in {} ({})", spool.display(), a.err);

    let start = g.lab(&["start-node", "3"]);
    assert!(start.status.success(), "{}", text(&start.stderr));
    // (A killed node leaves its veths: back, it makes c2's port anew, and
    // c1's goes with its task.)
    let t = within("c1's task and port gone, c2's port made again, the spool empty", Duration::from_secs(5), || {
        let ids = task_ids(&g, 1);
        !ids.contains(&t1)
            && nss[0].only_lo()
            && nss[1].ifindex("eth0").is_some_and(|i| Some(i) != c2_port)
            && nss[1].addrs("eth0").contains(&ips[1])
            && spooled() == 0
    });
    eprintln!("node3 back: the spooled DEL done and c2's port made in {:.2} s", t.as_secs_f64());

    // GC: only c3 is valid; web.3 (the lab's, no container) stays.
    let gc = netconf(
        "1.1.0",
        "mp-crash",
        Some("pod"),
        &sock3,
        json!({ "cni.dev/valid-attachments": [{ "containerID": "c3", "ifname": "eth0" }] }),
    );
    plugin(&bin, &[("CNI_COMMAND", "GC")], &gc).ok("GC");
    let ids = task_ids(&g, 1);
    assert!(!ids.contains(&t2) && ids.contains(&t3) && ids.contains(&"web.3".to_owned()), "after GC: {ids:?}");

    // c3's namespace deleted: reaped.
    let mut nss = nss;
    drop(nss.pop());
    let t = within("c3 reaped", Duration::from_secs(3), || !task_ids(&g, 1).contains(&t3));
    eprintln!("c3 reaped {:.2} s after its namespace was deleted", t.as_secs_f64());
}
