//! What the runtime hands the plugin: the network configuration (stdin)
//! and the `CNI_*` environment, checked; and which service a container
//! joins (`docs/cni-design.md` section 3).

use crate::SUPPORTED;
use crate::failure::Failure;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The largest network configuration read from stdin.
pub const MAX_CONF: usize = 1 << 20;

/// One plugin's network configuration (unknown keys ignored, as the spec
/// asks: runtimes add their own).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The spec version of the result to print.
    pub cni_version: String,
    /// The network's name (the conflist's).
    pub name: String,
    /// The plugin's type (`meshplane`).
    #[serde(rename = "type")]
    pub type_: String,
    /// The service the containers of this network join.
    #[serde(default)]
    pub service: Option<String>,
    /// The services `CNI_ARGS` or a pod annotation may choose instead
    /// (`["*"]`: any).
    #[serde(default)]
    pub services: Vec<String>,
    /// The node's admin socket.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// The tasks' weight (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Seconds ADD waits for the node (default 10, 1 to 120).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// An `ipam` section (refused: meshplane allocates addresses).
    #[serde(default)]
    pub ipam: Option<serde_json::Value>,
    /// The runtime's configuration (pod annotations).
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// The previous plugin's result (chained plugins).
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments the runtime still has.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// The runtime's configuration the plugin reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RuntimeConfig {
    /// Kubernetes pod annotations (containerd's CRI, with the capability
    /// declared).
    #[serde(default, rename = "io.kubernetes.cri.pod-annotations")]
    pub pod_annotations: BTreeMap<String, String>,
}

/// An attachment GC is told to keep.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// The container.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Its interface.
    pub ifname: String,
}

impl NetConf {
    /// The configuration from stdin's bytes, its version and values checked.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, Failure> {
        if bytes.len() > MAX_CONF {
            return Err(Failure::Decode(format!("{} bytes, more than {MAX_CONF}", bytes.len())));
        }
        let c: NetConf = serde_json::from_slice(bytes).map_err(|e| Failure::Decode(e.to_string()))?;
        if !SUPPORTED.contains(&c.cni_version.as_str()) {
            return Err(Failure::Version(c.cni_version));
        }
        if c.ipam.is_some() {
            return Err(Failure::Unsupported {
                key: "ipam".into(),
                why: "meshplane allocates addresses itself; remove the ipam section".into(),
            });
        }
        if let Some(s) = &c.socket
            && !s.is_absolute()
        {
            return Err(Failure::Config(format!("network {}: \"socket\" must be an absolute path", c.name)));
        }
        if c.timeout_secs.is_some_and(|t| !(1..=120).contains(&t)) {
            return Err(Failure::Config(format!("network {}: \"timeoutSecs\" must be 1 to 120", c.name)));
        }
        Ok(c)
    }
}

/// The `CNI_*` environment of one call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS` (empty counts as absent: containerd's DEL).
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS`, parsed.
    pub args: BTreeMap<String, String>,
    /// `CNI_PATH`.
    pub path: Option<String>,
}

impl Params {
    /// The environment as `var` gives it, each value checked.
    pub fn from_env(var: &dyn Fn(&str) -> Option<String>) -> Result<Params, Failure> {
        let some = |k: &str| var(k).filter(|v| !v.is_empty());
        let command = some("CNI_COMMAND").ok_or_else(|| env("CNI_COMMAND", "not set"))?;
        let container_id = some("CNI_CONTAINERID");
        if let Some(id) = &container_id
            && !valid_container_id(id)
        {
            return Err(env(
                "CNI_CONTAINERID",
                "letters, digits, '_', '.' and '-', starting alphanumeric, at most 256",
            ));
        }
        let ifname = some("CNI_IFNAME");
        if let Some(i) = &ifname
            && !valid_ifname(i)
        {
            return Err(env("CNI_IFNAME", &format!("{i:?}: 1-15 bytes, not . or .., no '/', ':' or whitespace")));
        }
        let mut args = BTreeMap::new();
        for pair in some("CNI_ARGS").iter().flat_map(|a| a.split(';')).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| env("CNI_ARGS", &format!("{pair:?} is not KEY=VALUE")))?;
            args.insert(k.to_owned(), v.to_owned());
        }
        Ok(Params { command, container_id, netns: some("CNI_NETNS"), ifname, args, path: some("CNI_PATH") })
    }

    /// A variable the command needs.
    pub fn need<'a>(&self, what: &'a Option<String>, var: &str) -> Result<&'a str, Failure> {
        what.as_deref().ok_or_else(|| env(var, &format!("needed by {}", self.command)))
    }
}

fn env(var: &str, why: &str) -> Failure {
    Failure::Env { var: var.into(), why: why.into() }
}

fn valid_container_id(id: &str) -> bool {
    id.len() <= 256
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_ifname(i: &str) -> bool {
    (1..=15).contains(&i.len())
        && i != "."
        && i != ".."
        && !i.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// The service a container of network `c` joins: `CNI_ARGS`'
/// `MESHPLANE_SERVICE`, else the pod annotation `meshplane.io/service`
/// (either only if the conflist's `services` allows it), else the
/// conflist's `service`. Addresses and MACs chosen by the runtime are
/// refused (meshplane allocates them).
pub fn service(c: &NetConf, p: &Params) -> Result<String, Failure> {
    for key in ["IP", "MAC"] {
        if let Some(v) = p.args.get(key) {
            return Err(Failure::Unsupported {
                key: format!("{key}={v}"),
                why: "meshplane allocates task addresses from the service's network; remove --ip/--mac-address".into(),
            });
        }
    }
    let chosen = p.args.get("MESHPLANE_SERVICE").map(|s| (s, "CNI_ARGS MESHPLANE_SERVICE")).or_else(|| {
        c.runtime_config.pod_annotations.get("meshplane.io/service").map(|s| (s, "pod annotation meshplane.io/service"))
    });
    if let Some((s, from)) = chosen {
        if c.services.iter().any(|x| x == "*" || x == s) {
            return Ok(s.clone());
        }
        return Err(Failure::Config(format!(
            "service {s:?} (from {from}) is not allowed by network {}: add it to \"services\" in its conflist",
            c.name
        )));
    }
    c.service.clone().ok_or_else(|| {
        Failure::Config(format!(
            "network {} names no service: set \"service\" in its conflist, or MESHPLANE_SERVICE= in CNI_ARGS",
            c.name
        ))
    })
}
