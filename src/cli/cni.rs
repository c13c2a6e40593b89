//! `meshplane cni install|uninstall` (`docs/cni-design.md` section 7):
//! files for container runtimes, no request to the node. `install` copies
//! the plugin (`meshplane-cni`) into a runtime's CNI bin directory as
//! `meshplane` and, with `--network`, writes the network's conflist, then
//! prints what podman, ctr and Kubernetes need. Both refuse to replace a
//! different file without `--force` (a plugin is ours when running it
//! without `CNI_COMMAND` prints our "about" line), and are idempotent.

use super::args::{CniCmd, CniInstall, CniUninstall, Conn};
use meshplane_cni::SUPPORTED;
use meshplane_cni::plugin::{ABOUT_PREFIX, DEFAULT_SOCKET};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The plugin's file name in a CNI bin directory (the conflists' `type`).
const PLUGIN_NAME: &str = "meshplane";

/// How long a plugin already installed may take to say what it is.
const ABOUT_WAIT: Duration = Duration::from_secs(5);

/// Why `cni install` or `cni uninstall` did not do it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CniError {
    /// A file could not be read, written or run.
    #[error("{}: {detail}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The plugin to install is not there.
    #[error(
        "no plugin at {}: build it (cargo build --release --bin meshplane-cni) or give --plugin PATH",
        .0.display()
    )]
    NoPlugin(PathBuf),
    /// The plugin to install is not meshplane's plugin.
    #[error(
        "{}: running it without CNI_COMMAND does not print \"{ABOUT_PREFIX}…\": it is not meshplane's CNI plugin (meshplane-cni; --force to install it anyway)",
        .0.display()
    )]
    NotAPlugin(PathBuf),
    /// A different file of someone else's is where the plugin goes.
    #[error(
        "{} is there and is not meshplane's CNI plugin (running it without CNI_COMMAND does not print \"{ABOUT_PREFIX}…\"): remove it, or --force to replace it",
        .0.display()
    )]
    Foreign(PathBuf),
    /// A different conflist is where the network's goes.
    #[error(
        "{} is there and differs from the conflist asked for: remove it (meshplane cni uninstall --network {network}), or --force to replace it",
        path.display()
    )]
    ConflistDiffers {
        /// The file.
        path: PathBuf,
        /// The network.
        network: String,
    },
    /// An argument is wrong.
    #[error("{0}")]
    Arg(String),
    /// `uninstall` of the plugin while conflists still use it.
    #[error(
        "the plugin is still used by {}: remove them first (meshplane cni uninstall --network NAME), or --force",
        .0.join(", ")
    )]
    StillUsed(Vec<String>),
}

/// Runs a `cni` command.
pub(crate) fn run(c: &Conn, cmd: &CniCmd) -> anyhow::Result<()> {
    let lines = match cmd {
        CniCmd::Install(a) => install(a, &c.state_dir)?,
        CniCmd::Uninstall(a) => uninstall(a)?,
    };
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

/// What a conflist says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conflist {
    /// Its `cniVersion`.
    pub(crate) cni_version: String,
    /// Its `name`.
    pub(crate) network: String,
    /// The service its containers join.
    pub(crate) service: Option<String>,
    /// The services CNI_ARGS or an annotation may choose.
    pub(crate) services: Vec<String>,
    /// The node's admin socket, when not the plugin's default.
    pub(crate) socket: Option<PathBuf>,
    /// Whether it declares the pod-annotations capability.
    pub(crate) pod_annotations: bool,
}

impl Conflist {
    /// The conflist `install` args ask for (`state_dir`: the global
    /// `--state-dir`), its values checked.
    pub(crate) fn from_args(a: &CniInstall, network: &str, state_dir: &Path) -> Result<Conflist, CniError> {
        check_name("--network", network, 128)?;
        if let Some(s) = &a.service {
            check_name("--service", s, 64)?;
        }
        if a.services.iter().any(|s| s == "*") && a.services.len() > 1 {
            return Err(CniError::Arg("--services: * (any service) stands alone".into()));
        }
        for s in a.services.iter().filter(|s| *s != "*") {
            check_name("--services", s, 64)?;
        }
        if a.service.is_none() && a.services.is_empty() {
            return Err(CniError::Arg(format!(
                "--network {network} would name no service: give --service SVC (and/or --services a,b or * for what containers may choose)"
            )));
        }
        if !SUPPORTED.contains(&a.cni_version.as_str()) {
            return Err(CniError::Arg(format!(
                "--cni-version {}: meshplane's plugin speaks {}",
                a.cni_version,
                SUPPORTED.join(", ")
            )));
        }
        Ok(Conflist {
            cni_version: a.cni_version.clone(),
            network: network.to_owned(),
            service: a.service.clone(),
            services: a.services.clone(),
            socket: socket_for(a.socket.as_deref(), state_dir)?,
            pod_annotations: a.pod_annotations,
        })
    }

    /// Its text, as written.
    pub(crate) fn text(&self) -> String {
        let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
        let mut plugin = vec![format!("\"type\": {}", q(PLUGIN_NAME))];
        if let Some(s) = &self.service {
            plugin.push(format!("\"service\": {}", q(s)));
        }
        let services: Vec<String> = self.services.iter().map(|s| q(s)).collect();
        plugin.push(format!("\"services\": [{}]", services.join(", ")));
        if let Some(s) = &self.socket {
            plugin.push(format!("\"socket\": {}", q(&s.to_string_lossy())));
        }
        if self.pod_annotations {
            plugin.push("\"capabilities\": { \"io.kubernetes.cri.pod-annotations\": true }".into());
        }
        let plugin: Vec<String> = plugin.iter().map(|l| format!("      {l}")).collect();
        format!(
            "{{\n  \"cniVersion\": {},\n  \"name\": {},\n  \"plugins\": [\n    {{\n{}\n    }}\n  ]\n}}\n",
            q(&self.cni_version),
            q(&self.network),
            plugin.join(",\n")
        )
    }
}

/// A network or service name: letters, digits, `_`, `.`, `-`, starting
/// alphanumeric (the CNI spec's rule for network names), at most `max`.
fn check_name(flag: &str, s: &str, max: usize) -> Result<(), CniError> {
    let ok = s.len() <= max
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::Arg(format!(
            "{flag} {s:?}: letters, digits, '_', '.' and '-', starting with a letter or digit, at most {max}"
        )))
    }
}

/// The conflist's `socket`: `--socket` made absolute, else the state
/// directory's when it is not the default one (whose socket is the
/// plugin's default, left out).
fn socket_for(socket: Option<&Path>, state_dir: &Path) -> Result<Option<PathBuf>, CniError> {
    let absolute =
        |p: &Path| std::path::absolute(p).map_err(|e| CniError::Io { path: p.to_owned(), detail: e.to_string() });
    match socket {
        Some(s) => absolute(s).map(Some),
        None if state_dir == Path::new(crate::node::DEFAULT_STATE_DIR) => Ok(None),
        None => Ok(Some(absolute(state_dir)?.join("admin.sock")).filter(|s| s != Path::new(DEFAULT_SOCKET))),
    }
}

/// What to do with a file that is to hold `new`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Write it.
    Write,
    /// It already holds that: leave it.
    Same,
}

/// The conflist at `path` (`existing`: what it holds, if it is there):
/// written unless it says the same (byte for byte, or as JSON); a
/// different one only with `force`.
pub(crate) fn conflist_step(
    path: &Path,
    network: &str,
    existing: Option<&[u8]>,
    new: &[u8],
    force: bool,
) -> Result<Step, CniError> {
    let Some(old) = existing else { return Ok(Step::Write) };
    let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
    if old == new || json(old).is_some_and(|o| Some(o) == json(new)) {
        return Ok(Step::Same);
    }
    if force {
        return Ok(Step::Write);
    }
    Err(CniError::ConflistDiffers { path: path.to_owned(), network: network.to_owned() })
}

/// The plugin at `path` (`existing`: its bytes, if it is there): written
/// unless it is the same; a different one only if it is ours (`ours`,
/// asked only then) or with `force`.
pub(crate) fn plugin_step(
    path: &Path,
    existing: Option<&[u8]>,
    new: &[u8],
    force: bool,
    ours: impl FnOnce() -> bool,
) -> Result<Step, CniError> {
    match existing {
        None => Ok(Step::Write),
        Some(old) if old == new => Ok(Step::Same),
        Some(_) if force || ours() => Ok(Step::Write),
        Some(_) => Err(CniError::Foreign(path.to_owned())),
    }
}

/// Whether running `path` without `CNI_COMMAND` prints our "about" line
/// on stderr (within [`ABOUT_WAIT`]; it is killed after that).
fn says_about(path: &Path) -> bool {
    let spawn = || {
        Command::new(path)
            .env_remove("CNI_COMMAND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    };
    // A file just written may be held open for writing a moment by a
    // process forked meanwhile (ETXTBSY): tried again.
    let mut child = spawn();
    for _ in 0..10 {
        match &child {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
                child = spawn();
            }
            _ => break,
        }
    }
    let Ok(mut child) = child else { return false };
    let until = Instant::now() + ABOUT_WAIT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
    let mut err = String::new();
    child.stderr.take().is_some_and(|mut e| e.read_to_string(&mut err).is_ok()) && err.starts_with(ABOUT_PREFIX)
}

/// `path`'s bytes, or `None` if it is not there.
fn read_if_there(path: &Path) -> Result<Option<Vec<u8>>, CniError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, &e)),
    }
}

fn io(path: &Path, e: &std::io::Error) -> CniError {
    CniError::Io { path: path.to_owned(), detail: e.to_string() }
}

/// Writes `bytes` to `path` with `mode`: to a temporary file beside it,
/// then renamed over it (a runtime never runs or reads half a file).
fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CniError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path, &e)
    })
}

fn make_dir(dir: &Path) -> Result<(), CniError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, &e))
}

/// `cni install`: the lines to print.
pub(crate) fn install(a: &CniInstall, state_dir: &Path) -> Result<Vec<String>, CniError> {
    // Everything checked before anything is written.
    let conflist = match &a.network {
        Some(n) => Some(Conflist::from_args(a, n, state_dir)?),
        None => None,
    };
    let from = match &a.plugin {
        Some(p) => p.clone(),
        None => {
            let exe = std::env::current_exe().map_err(|e| io(Path::new("/proc/self/exe"), &e))?;
            exe.with_file_name("meshplane-cni")
        }
    };
    let new = read_if_there(&from)?.ok_or_else(|| CniError::NoPlugin(from.clone()))?;
    if !a.force && !says_about(&from) {
        return Err(CniError::NotAPlugin(from));
    }
    let to = a.bin_dir.join(PLUGIN_NAME);
    // The conflist's refusal comes before the plugin is touched.
    let conf = match &conflist {
        Some(c) => {
            let path = a.conf_dir.join(format!("{:02}-{}.conflist", a.priority, c.network));
            let text = c.text();
            let step = conflist_step(&path, &c.network, read_if_there(&path)?.as_deref(), text.as_bytes(), a.force)?;
            Some((c, path, text, step))
        }
        None => None,
    };
    let mut lines = Vec::new();
    match plugin_step(&to, read_if_there(&to)?.as_deref(), &new, a.force, || says_about(&to))? {
        Step::Write => {
            make_dir(&a.bin_dir)?;
            replace(&to, &new, 0o755)?;
            lines.push(format!("installed the plugin: {} (from {})", to.display(), from.display()));
        }
        Step::Same => lines.push(format!("the plugin is installed: {}", to.display())),
    }
    let Some((c, path, text, step)) = conf else {
        let example = Conflist {
            cni_version: "1.0.0".into(),
            network: "web-net".into(),
            service: Some("web".into()),
            services: Vec::new(),
            socket: None,
            pod_annotations: true,
        };
        lines.push(format!(
            "no --network: no conflist written. With --network web-net --service web --pod-annotations, {} would hold:",
            a.conf_dir.join(format!("{:02}-web-net.conflist", a.priority)).display()
        ));
        lines.extend(example.text().lines().map(str::to_owned));
        return Ok(lines);
    };
    match step {
        Step::Write => {
            make_dir(&a.conf_dir)?;
            replace(&path, text.as_bytes(), 0o644)?;
            lines.push(format!("wrote {}", path.display()));
        }
        Step::Same => lines.push(format!("{} is already so", path.display())),
    }
    lines.extend(runtime_notes(a, c, &path));
    Ok(lines)
}

/// What each runtime needs to use network `c` (written at `path`).
fn runtime_notes(a: &CniInstall, c: &Conflist, path: &Path) -> Vec<String> {
    let n = &c.network;
    let (bin, conf) = (a.bin_dir.display(), a.conf_dir.display());
    let mut out = vec![
        format!(
            "podman: in containers.conf, [network] network_backend = \"cni\" (and cni_plugin_dirs = [\"{bin}\"], network_config_dir = \"{conf}\" if they are not podman's), then: podman run --network {n} …"
        ),
        format!(
            "ctr: ctr run --cni uses the first conflist in /etc/cni/net.d by file name and plugins from /opt/cni/bin: give {} the lowest --priority there",
            path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
        ),
    ];
    if !c.services.is_empty() {
        let which = if c.services == ["*"] { "any service".to_owned() } else { c.services.join(", ") };
        out.push(format!("containers may choose {which}: CNI_ARGS=MESHPLANE_SERVICE=NAME podman run --network {n} …"));
    }
    out.push(if c.pod_annotations {
        format!(
            "Kubernetes (containerd): the pod annotation meshplane.io/service chooses a service of --services; the kubelet's node uses {conf}"
        )
    } else {
        "Kubernetes (containerd): --pod-annotations lets the pod annotation meshplane.io/service choose a service of --services".into()
    });
    out
}

/// Whether conflist `text` runs meshplane's plugin (and, given a
/// `network`, is that network's).
pub(crate) fn ours(text: &[u8], network: Option<&str>) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(text) else { return false };
    let named = network.is_none_or(|n| v.get("name").and_then(|x| x.as_str()) == Some(n));
    let runs = v
        .get("plugins")
        .and_then(|p| p.as_array())
        .is_some_and(|p| p.iter().any(|p| p.get("type").and_then(|t| t.as_str()) == Some(PLUGIN_NAME)));
    named && runs
}

/// The conflists in `dir` that run meshplane's plugin (of `network`, if
/// given).
fn our_conflists(dir: &Path, network: Option<&str>) -> Result<Vec<PathBuf>, CniError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir, &e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let path = e.map_err(|e| io(dir, &e))?.path();
        if path.extension().is_some_and(|x| x == "conflist") && read_if_there(&path)?.is_some_and(|t| ours(&t, network))
        {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// `cni uninstall`: the lines to print.
pub(crate) fn uninstall(a: &CniUninstall) -> Result<Vec<String>, CniError> {
    if let Some(n) = &a.network {
        let files = our_conflists(&a.conf_dir, Some(n))?;
        if files.is_empty() {
            return Ok(vec![format!("no conflist of network {n} in {}", a.conf_dir.display())]);
        }
        let mut lines = Vec::new();
        for f in files {
            std::fs::remove_file(&f).map_err(|e| io(&f, &e))?;
            lines.push(format!("removed {}", f.display()));
        }
        return Ok(lines);
    }
    let users = our_conflists(&a.conf_dir, None)?;
    if !users.is_empty() && !a.force {
        return Err(CniError::StillUsed(users.iter().map(|p| p.display().to_string()).collect()));
    }
    let path = a.bin_dir.join(PLUGIN_NAME);
    if !path.exists() {
        return Ok(vec![format!("no plugin at {}", path.display())]);
    }
    if !a.force && !says_about(&path) {
        return Err(CniError::Foreign(path));
    }
    std::fs::remove_file(&path).map_err(|e| io(&path, &e))?;
    Ok(vec![format!("removed {}", path.display())])
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: CniCmd,
    }

    fn install_args(args: &[&str]) -> CniInstall {
        let argv = ["meshplane", "install"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).unwrap().cmd {
            CniCmd::Install(a) => a,
            CniCmd::Uninstall(_) => unreachable!(),
        }
    }

    const DEFAULT: &str = crate::node::DEFAULT_STATE_DIR;

    #[test]
    fn the_conflist_says_what_was_asked() {
        let a = install_args(&["--network", "web-net", "--service", "web", "--pod-annotations"]);
        let c = Conflist::from_args(&a, "web-net", Path::new(DEFAULT)).unwrap();
        assert_eq!(
            c.text(),
            r#"{
  "cniVersion": "1.0.0",
  "name": "web-net",
  "plugins": [
    {
      "type": "meshplane",
      "service": "web",
      "services": [],
      "capabilities": { "io.kubernetes.cri.pod-annotations": true }
    }
  ]
}
"#
        );
        // The plugin reads it (the runtime hands it the plugin's part with
        // the list's name and version).
        let v: serde_json::Value = serde_json::from_str(&c.text()).unwrap();
        let mut p = v["plugins"][0].clone();
        p["name"] = v["name"].clone();
        p["cniVersion"] = v["cniVersion"].clone();
        let nc = meshplane_cni::conf::NetConf::parse(p.to_string().as_bytes()).unwrap();
        assert_eq!((nc.service.as_deref(), nc.type_.as_str()), (Some("web"), "meshplane"));

        // A state directory of its own: its socket; services; 1.1.0.
        let a = install_args(&[
            "--network",
            "mp-pod-n1",
            "--services",
            "papi,db",
            "--cni-version",
            "1.1.0",
            "--socket",
            "/tmp/lab/node1/admin.sock",
        ]);
        let text = Conflist::from_args(&a, "mp-pod-n1", Path::new(DEFAULT)).unwrap().text();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "cniVersion": "1.1.0", "name": "mp-pod-n1", "plugins": [{
                "type": "meshplane", "services": ["papi", "db"], "socket": "/tmp/lab/node1/admin.sock" }] })
        );
        let a = install_args(&["--network", "n", "--service", "web"]);
        let c = Conflist::from_args(&a, "n", Path::new("/tmp/lab/node2")).unwrap();
        assert_eq!(c.socket.as_deref(), Some(Path::new("/tmp/lab/node2/admin.sock")));
        let c = Conflist::from_args(&a, "n", Path::new("rel")).unwrap();
        assert_eq!(c.socket.unwrap(), std::env::current_dir().unwrap().join("rel/admin.sock"));
    }

    #[test]
    fn bad_arguments_are_refused_with_what_to_do() {
        let refused = |args: &[&str]| {
            let a = install_args(args);
            Conflist::from_args(&a, a.network.as_deref().unwrap(), Path::new(DEFAULT)).unwrap_err().to_string()
        };
        assert!(refused(&["--network", "web net", "--service", "web"]).starts_with("--network \"web net\": letters"));
        assert!(refused(&["--network", "n"]).contains("would name no service: give --service"));
        assert!(refused(&["--network", "n", "--services", "*,a"]).contains("* (any service) stands alone"));
        assert!(refused(&["--network", "n", "--service", "w", "--cni-version", "0.3.1"]).contains("speaks 0.4.0"));
        // Conflist options without --network: clap says so.
        let argv = ["meshplane", "install", "--service", "web"];
        assert!(Cli::try_parse_from(argv).is_err());
        let a = install_args(&[]);
        assert_eq!((a.priority, a.cni_version.as_str(), a.force), (50, "1.0.0", false));
    }

    #[test]
    fn a_different_file_is_replaced_only_when_ours_or_forced() {
        let p = Path::new("/x/50-n.conflist");
        let new = b"{\"name\": \"n\"}\n";
        assert_eq!(conflist_step(p, "n", None, new, false), Ok(Step::Write));
        assert_eq!(conflist_step(p, "n", Some(new), new, false), Ok(Step::Same));
        assert_eq!(conflist_step(p, "n", Some(b"{\"name\":\"n\"}"), new, false), Ok(Step::Same), "same JSON");
        let e = conflist_step(p, "n", Some(b"{\"name\":\"m\"}"), new, false).unwrap_err();
        assert!(e.to_string().contains("differs from the conflist asked for"), "{e}");
        assert_eq!(conflist_step(p, "n", Some(b"{}"), new, true), Ok(Step::Write));

        let q = Path::new("/opt/cni/bin/meshplane");
        let never = || -> bool { panic!("asked whether an identical or absent plugin is ours") };
        assert_eq!(plugin_step(q, None, b"new", false, never), Ok(Step::Write));
        assert_eq!(plugin_step(q, Some(b"new"), b"new", false, never), Ok(Step::Same));
        assert_eq!(plugin_step(q, Some(b"old"), b"new", false, || true), Ok(Step::Write));
        assert_eq!(plugin_step(q, Some(b"old"), b"new", false, || false), Err(CniError::Foreign(q.to_owned())));
        assert_eq!(plugin_step(q, Some(b"old"), b"new", true, || false), Ok(Step::Write));
    }

    #[test]
    fn conflists_of_ours_are_told_apart() {
        let c = br#"{"cniVersion":"1.0.0","name":"web-net","plugins":[{"type":"meshplane"}]}"#;
        assert!(ours(c, None) && ours(c, Some("web-net")));
        assert!(!ours(c, Some("other")));
        assert!(!ours(br#"{"name":"web-net","plugins":[{"type":"bridge"}]}"#, None));
        assert!(!ours(b"not json", None));
    }

    /// A temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A plugin stand-in: a script that says `about` on stderr.
    fn script(path: &Path, about: &str) {
        std::fs::write(path, format!("#!/bin/sh\necho '{about}' >&2\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn install_and_uninstall_in_directories_of_their_own() {
        let d = TempDir(std::env::temp_dir().join(format!("mpcni-install-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&d.0);
        std::fs::create_dir(&d.0).unwrap();
        let plugin = d.0.join("meshplane-cni");
        script(&plugin, meshplane_cni::plugin::ABOUT);
        let (bin, conf) = (d.0.join("cni/bin"), d.0.join("cni/net.d"));
        let (bin_s, conf_s, plugin_s) = (bin.to_str().unwrap(), conf.to_str().unwrap(), plugin.to_str().unwrap());
        let base = ["--bin-dir", bin_s, "--conf-dir", conf_s, "--plugin", plugin_s];
        let with = |extra: &[&str]| install_args(&[&base[..], extra].concat());
        let net = ["--network", "mp-pod-n1", "--service", "pod", "--priority", "10"];

        let lines = install(&with(&net), Path::new(DEFAULT)).unwrap();
        assert!(lines[0].starts_with("installed the plugin"), "{lines:?}");
        assert!(lines[1].starts_with("wrote") && lines[1].ends_with("10-mp-pod-n1.conflist"), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("podman:")) && lines.iter().any(|l| l.starts_with("ctr:")));
        let installed = bin.join("meshplane");
        assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(&plugin).unwrap());
        assert_eq!(std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777, 0o755);
        // Again: nothing to do.
        let lines = install(&with(&net), Path::new(DEFAULT)).unwrap();
        assert!(lines[0].starts_with("the plugin is installed") && lines[1].ends_with("is already so"), "{lines:?}");
        // Another service for the same file: refused, unless forced.
        let other = ["--network", "mp-pod-n1", "--service", "api", "--priority", "10"];
        let e = install(&with(&other), Path::new(DEFAULT)).unwrap_err();
        assert!(matches!(e, CniError::ConflistDiffers { .. }), "{e}");
        install(&with(&[&other[..], &["--force"]].concat()), Path::new(DEFAULT)).unwrap();
        assert!(std::fs::read_to_string(conf.join("10-mp-pod-n1.conflist")).unwrap().contains("\"api\""));
        // A newer plugin of ours replaces the old; someone else's is kept.
        script(&plugin, &format!("{} (newer)", meshplane_cni::plugin::ABOUT));
        assert!(install(&with(&[]), Path::new(DEFAULT)).unwrap()[0].starts_with("installed"));
        script(&installed, "bridge plugin v1.1.1");
        let e = install(&with(&[]), Path::new(DEFAULT)).unwrap_err();
        assert_eq!(e, CniError::Foreign(installed.clone()));
        // A plugin that is not ours is not installed.
        let not = d.0.join("not-a-plugin");
        script(&not, "usage: meshplane …");
        let e = install_args(&["--bin-dir", bin_s, "--plugin", not.to_str().unwrap()]);
        assert_eq!(install(&e, Path::new(DEFAULT)).unwrap_err(), CniError::NotAPlugin(not));
        script(&installed, meshplane_cni::plugin::ABOUT);

        // Uninstall: the plugin stays while a conflist uses it.
        let un = |extra: &[&str]| {
            let argv = [&["meshplane", "uninstall", "--bin-dir", bin_s, "--conf-dir", conf_s][..], extra].concat();
            match Cli::try_parse_from(argv).unwrap().cmd {
                CniCmd::Uninstall(a) => uninstall(&a),
                CniCmd::Install(_) => unreachable!(),
            }
        };
        assert!(matches!(un(&[]), Err(CniError::StillUsed(f)) if f.len() == 1));
        assert_eq!(un(&["--network", "mp-pod-n1"]).unwrap().len(), 1);
        assert!(un(&["--network", "mp-pod-n1"]).unwrap()[0].starts_with("no conflist"));
        assert!(un(&[]).unwrap()[0].starts_with("removed"));
        assert!(!installed.exists());
        assert!(un(&[]).unwrap()[0].starts_with("no plugin"));
    }
}
