//! `meshplane lab up --podman`: web's tasks as podman containers joined
//! through CNI (`docs/cni-design.md` §8, "`scripts/demo --podman`").
//!
//! Everything podman needs lives in `DIR/podman` (the lab's directory):
//! its configuration (`containers.conf`: runc, cgroupfs, file events,
//! the CNI backend with the bin and conflist directories below;
//! `storage.conf`: vfs, graph and run roots below), the container image as
//! a directory (`rootfs`: busybox-static and a CGI that answers `NAME saw
//! ADDR:PORT`, as `tool http-name` does), and the record of the lab's
//! containers (`containers`: task id, container name, container id). The
//! lab installs the plugin (`meshplane cni install`) with one network per
//! node, `mp-lab-nN`, whose conflist names that node's admin socket and
//! the service `web`, then runs `mp-lab-web-N` on it: the plugin's ADD
//! makes the task `web.N` on node N. `down` removes the containers
//! (their DELs reach the nodes, which must still run), then `DIR/podman`.

use super::common::{cli, wait};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command as Cmd, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The directory in the lab's directory that holds podman's files.
const SUBDIR: &str = "podman";
/// The record of the lab's containers in it.
const RECORD: &str = "containers";

/// Why podman could not do what the lab asked.
#[derive(Debug, thiserror::Error)]
pub(super) enum PodmanError {
    /// A file or directory of the lab's could not be written or read.
    #[error("{}: {detail}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A command failed (or ran out of time).
    #[error("{what} failed: {detail}")]
    Command {
        /// The command line.
        what: String,
        /// Its exit and stderr.
        detail: String,
    },
    /// A container's task is not the one the lab expected.
    #[error("container {container}: {detail}")]
    Task {
        /// The container's name.
        container: String,
        /// What is wrong.
        detail: String,
    },
}

/// `io::Error` at `path` as a `PodmanError`.
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PodmanError + '_ {
    move |e| PodmanError::Io { path: path.to_owned(), detail: e.to_string() }
}

/// The lab's podman: its directory `DIR/podman`.
pub(super) struct Podman {
    dir: PathBuf,
}

/// A container of the lab's, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Container {
    /// Its task's id (`web.N`).
    pub(super) task: String,
    /// Its name (`mp-lab-web-N`).
    pub(super) name: String,
    /// Its id (64 hex digits).
    pub(super) id: String,
}

/// The container of node `n`'s web task.
pub(super) fn container_name(n: u8) -> String {
    format!("mp-lab-web-{n}")
}

/// Runs `cmd` for at most `secs` seconds (then kills it): its output. A
/// process it leaves holding its stdout or stderr (conmon) does not hold
/// the caller: the output is what arrived within 2 s of its exit.
pub(super) fn output_within(cmd: &mut Cmd, secs: u64) -> std::io::Result<Output> {
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
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut killed = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            killed = true;
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let grace = Duration::from_secs(2);
    let mut stderr = err.recv_timeout(grace).unwrap_or_default();
    if killed {
        stderr.extend_from_slice(format!("(killed after {secs} s)").as_bytes());
    }
    Ok(Output { status, stdout: out.recv_timeout(grace).unwrap_or_default(), stderr })
}

impl Podman {
    /// The lab's podman (nothing made yet).
    pub(super) fn of(lab: &Path) -> Podman {
        Podman { dir: lab.join(SUBDIR) }
    }

    /// True if the lab made podman files (`lab up --podman`).
    pub(super) fn exists(&self) -> bool {
        self.dir.join("containers.conf").exists()
    }

    /// A path in its directory, as a string.
    fn s(&self, p: &str) -> String {
        self.dir.join(p).to_string_lossy().into_owned()
    }

    /// `podman ARGS` with the lab's configuration (and no `CNI_ARGS` from
    /// the caller's environment).
    pub(super) fn cmd(&self, args: &[&str]) -> Cmd {
        let mut c = Cmd::new("podman");
        c.args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env_remove("CNI_ARGS");
        c
    }

    /// `podman ARGS`, which must succeed within `secs`: its stdout.
    fn ok(&self, args: &[&str], secs: u64) -> Result<String, PodmanError> {
        run_ok(&mut self.cmd(args), secs)
    }

    /// Whether `lab up --podman` can run here (before anything is made):
    /// podman runs, busybox-static and the CNI plugin (beside `bin`) are
    /// there.
    pub(super) fn preflight(bin: &str) -> Result<(), PodmanError> {
        if let Err(e) = Cmd::new("podman").arg("--version").output() {
            return Err(PodmanError::Command {
                what: "podman --version".to_owned(),
                detail: format!(
                    "{e} (scripts/bootstrap installs podman; scripts/demo --podman falls back to namespaces without it)"
                ),
            });
        }
        let plugin = Path::new(bin).with_file_name("meshplane-cni");
        for (p, what) in [
            (Path::new("/bin/busybox"), "busybox-static (scripts/bootstrap installs it)"),
            (plugin.as_path(), "build it: cargo build --bin meshplane-cni"),
        ] {
            if !p.exists() {
                return Err(PodmanError::Io { path: p.to_owned(), detail: format!("missing: {what}") });
            }
        }
        Ok(())
    }

    /// Its directories, configuration and the rootfs.
    pub(super) fn setup(&self) -> Result<(), PodmanError> {
        for d in ["cni/bin", "cni/net.d", "tmp", "storage", "run"] {
            let p = self.dir.join(d);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        // `default_ulimits`: podman's default nofile limit is above what
        // this host allows a process.
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
            bin = self.s("cni/bin"),
            netd = self.s("cni/net.d"),
            events = self.s("events.log"),
            tmp = self.s("tmp"),
        );
        let p = self.dir.join("containers.conf");
        std::fs::write(&p, conf).map_err(io_err(&p))?;
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            self.s("storage"),
            self.s("run")
        );
        let p = self.dir.join("storage.conf");
        std::fs::write(&p, storage).map_err(io_err(&p))?;
        rootfs(&self.dir.join("rootfs"))
    }

    /// `meshplane cni install` of network `mp-lab-nN`: the plugin (beside
    /// `bin`) in `cni/bin`, the conflist naming node `n`'s admin socket
    /// and the service `web` in `cni/net.d`.
    pub(super) fn install(&self, bin: &str, lab: &Path, n: u8) -> Result<(), PodmanError> {
        let sock = lab.join(format!("node{n}/admin.sock")).to_string_lossy().into_owned();
        let (bin_dir, conf_dir, net) = (self.s("cni/bin"), self.s("cni/net.d"), format!("mp-lab-n{n}"));
        #[rustfmt::skip]
        let args = ["cni", "install", "--bin-dir", &bin_dir, "--conf-dir", &conf_dir,
            "--network", &net, "--service", "web", "--socket", &sock];
        run_ok(Cmd::new(bin).args(args), 30).map(drop)
    }

    /// Runs node `n`'s web container on network `mp-lab-nN` (the plugin
    /// makes its task there), checks that its task is `web.N` on node `n`,
    /// and records it.
    pub(super) fn run_web(&self, bin: &str, lab: &Path, n: u8) -> Result<Container, PodmanError> {
        let (name, task) = (container_name(n), format!("web.{n}"));
        let root = format!("{}:O", self.s("rootfs"));
        let net = format!("mp-lab-n{n}");
        // The name the CGI answers with, then httpd on IPv4 (REMOTE_ADDR
        // 198.18.0.100, not [::ffff:198.18.0.100]).
        let script = format!("echo {task} > /tmp/name; exec httpd -f -p 0.0.0.0:8080 -h /www");
        #[rustfmt::skip]
        let args = ["run", "-d", "--name", &name, "--network", &net, "--rootfs", &root, "/bin/sh", "-c", &script];
        let id = self.ok(&args, 60)?.trim().to_owned();
        let c = Container { task: task.clone(), name: name.clone(), id };
        self.record(&c)?;
        // ADD returned once the task's port was up; node1's copy of the
        // state may lag the leader's a little.
        let mut found = None;
        let waited = wait(&format!("{name}'s task in node1's state"), 10, || {
            found = task_of(bin, lab, &c.id);
            found.is_some()
        });
        let detail = match (waited, found) {
            (Ok(()), Some((id, node))) if id == task && node == format!("node{n}") => return Ok(c),
            (Ok(()), Some((id, node))) => format!("its task is {id} on {node}, not {task} on node{n}"),
            _ => "no task with its id".to_owned(),
        };
        Err(PodmanError::Task { container: name, detail })
    }

    /// Appends `c` to the record.
    fn record(&self, c: &Container) -> Result<(), PodmanError> {
        let p = self.dir.join(RECORD);
        let mut text = std::fs::read_to_string(&p).unwrap_or_default();
        text.push_str(&format!("{} {} {}\n", c.task, c.name, c.id));
        std::fs::write(&p, text).map_err(io_err(&p))
    }

    /// The recorded containers (lines of three fields; others skipped).
    pub(super) fn containers(&self) -> Vec<Container> {
        let text = std::fs::read_to_string(self.dir.join(RECORD)).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let [task, name, id] = f[..] else { return None };
                Some(Container { task: task.to_owned(), name: name.to_owned(), id: id.to_owned() })
            })
            .collect()
    }

    /// The state of the lab's containers (`podman ps -a`): name and
    /// status, or why it could not be read.
    pub(super) fn ps(&self) -> Result<Vec<(String, String)>, PodmanError> {
        let out = self.ok(&["ps", "-a", "--format", "{{.Names}}\t{{.Status}}"], 30)?;
        Ok(out.lines().filter_map(|l| l.split_once('\t')).map(|(n, s)| (n.to_owned(), s.to_owned())).collect())
    }

    /// Removes every container of the lab's storage (`rm -a -f -t 0`:
    /// busybox as pid 1 ignores SIGTERM; each DEL reaches its node, so
    /// the nodes must still run), then everything in `DIR/podman`: what
    /// still runs from it (conmon) is killed, what is mounted under it
    /// unmounted. The number of containers removed.
    pub(super) fn down(&self) -> Result<usize, PodmanError> {
        if !self.dir.exists() {
            return Ok(0);
        }
        let mut removed = 0;
        let mut failed = None;
        if self.exists() {
            match self.ok(&["rm", "-a", "-f", "-t", "0"], 120) {
                Ok(out) => removed = out.lines().filter(|l| !l.trim().is_empty()).count(),
                Err(e) => failed = Some(e),
            }
        }
        kill_leftovers(&self.dir);
        for m in mounts_under(&self.dir) {
            let _ = Cmd::new("umount").args(["-l", &m]).status();
        }
        std::fs::remove_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        match failed {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }
}

/// Runs `cmd` (within `secs`), which must succeed: its stdout.
fn run_ok(cmd: &mut Cmd, secs: u64) -> Result<String, PodmanError> {
    let what = format!("{} {}", cmd.get_program().to_string_lossy(), {
        let a: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        a.join(" ")
    });
    let o = output_within(cmd, secs).map_err(|e| PodmanError::Command { what: what.clone(), detail: e.to_string() })?;
    if !o.status.success() {
        let detail = format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim());
        return Err(PodmanError::Command { what, detail });
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The id and node of the task whose container is `container_id`, as
/// node1 knows it.
fn task_of(bin: &str, lab: &Path, container_id: &str) -> Option<(String, String)> {
    let out = cli(bin, lab, 1, &["task", "ls", "--format", "json"]).ok()?;
    let tasks: serde_json::Value = serde_json::from_str(&out).ok()?;
    let t = tasks.as_array()?.iter().find(|t| t["container"]["id"] == container_id)?;
    Some((t["id"].as_str()?.to_owned(), t["node"].as_str()?.to_owned()))
}

/// The container image as a directory: busybox-static, its applets, and
/// a CGI that answers `NAME saw ADDR:PORT` (`NAME` from `/tmp/name`), as
/// `tool http-name` does.
fn rootfs(dir: &Path) -> Result<(), PodmanError> {
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "www/cgi-bin"] {
        let p = dir.join(d);
        std::fs::create_dir_all(&p).map_err(io_err(&p))?;
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err(PodmanError::Io {
            path: busybox.to_owned(),
            detail: "missing: the containers' image needs busybox-static (scripts/bootstrap installs it)".to_owned(),
        });
    }
    let p = dir.join("bin/busybox");
    std::fs::copy(busybox, &p).map_err(io_err(&p))?;
    for a in ["sh", "httpd", "wget", "nslookup", "cat", "ip", "timeout"] {
        let p = dir.join("bin").join(a);
        std::os::unix::fs::symlink("busybox", &p).map_err(io_err(&p))?;
    }
    let p = dir.join("etc/passwd");
    std::fs::write(&p, "root:x:0:0:root:/:/bin/sh\n").map_err(io_err(&p))?;
    let cgi = dir.join("www/cgi-bin/index.cgi");
    let script = concat!(
        "#!/bin/sh\n",
        r#"printf "Content-Type: text/plain\r\n\r\n%s saw %s:%s\n" "$(cat /tmp/name)" "$REMOTE_ADDR" "$REMOTE_PORT""#,
        "\n"
    );
    std::fs::write(&cgi, script).map_err(io_err(&cgi))?;
    let mut perm = std::fs::metadata(&cgi).map_err(io_err(&cgi))?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&cgi, perm).map_err(io_err(&cgi))
}

/// Live processes whose command line mentions a path in `dir` (never
/// this process): their pids.
fn leftovers(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let needle = format!("{}/", dir.display());
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = String::from_utf8_lossy(&std::fs::read(p.path().join("cmdline")).ok()?).replace('\0', " ");
            let stat = std::fs::read_to_string(p.path().join("stat")).ok()?;
            let zombie = stat.rfind(')').is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z'));
            (pid != me && cmdline.contains(&needle) && !zombie).then_some(pid)
        })
        .collect()
}

/// Kills (SIGKILL) what podman left running from `dir` (conmon), after 3 s
/// for it to end by itself.
fn kill_leftovers(dir: &Path) {
    let t0 = Instant::now();
    while !leftovers(dir).is_empty() && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in leftovers(dir) {
        eprintln!("lab down: killing process {pid}, left running from {}", dir.display());
        crate::sys::kill("-KILL", &pid.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_skips_bad_lines() {
        let dir = std::env::temp_dir().join(format!("mp-lab-podman-unit-{}", std::process::id()));
        let pm = Podman::of(&dir);
        std::fs::create_dir_all(&pm.dir).expect("dir");
        let a = Container { task: "web.1".into(), name: container_name(1), id: "ab".repeat(32) };
        let b = Container { task: "web.2".into(), name: container_name(2), id: "cd".repeat(32) };
        pm.record(&a).expect("record");
        pm.record(&b).expect("record");
        let p = pm.dir.join(RECORD);
        let mut text = std::fs::read_to_string(&p).expect("read");
        text.push_str("half line\n\nweb.3 mp-lab-web-3 ef one too many\n");
        std::fs::write(&p, text).expect("write");
        assert_eq!(pm.containers(), vec![a, b]);
        assert!(!pm.exists(), "no configuration written");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_rootfs_answers_like_http_name() {
        if !Path::new("/bin/busybox").exists() {
            eprintln!("skipped: /bin/busybox missing");
            return;
        }
        let dir = std::env::temp_dir().join(format!("mp-lab-rootfs-unit-{}", std::process::id()));
        rootfs(&dir).expect("rootfs");
        std::fs::write(dir.join("tmp/name"), "web.2\n").expect("name");
        // The CGI runs on the host's busybox with the name file moved.
        let cgi = std::fs::read_to_string(dir.join("www/cgi-bin/index.cgi")).expect("cgi");
        let cgi = cgi.replace("/tmp/name", &dir.join("tmp/name").to_string_lossy());
        let out = Cmd::new("/bin/busybox")
            .args(["sh", "-c", &cgi])
            .env("REMOTE_ADDR", "198.18.0.100")
            .env("REMOTE_PORT", "40001")
            .output()
            .expect("running the CGI");
        let text = String::from_utf8_lossy(&out.stdout);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or("");
        assert_eq!(body, "web.2 saw 198.18.0.100:40001", "{text:?}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn output_within_kills_at_the_deadline() {
        let t0 = Instant::now();
        let o = output_within(Cmd::new("sleep").arg("30"), 1).expect("sleep");
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("killed after 1 s"));
        assert!(t0.elapsed() < Duration::from_secs(10));
        let o = output_within(Cmd::new("echo").arg("hi"), 5).expect("echo");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    }
}
