//! What the plugin and the node say to each other over the node's admin
//! socket: the request inside `AdminRequest::Cni` (op `"cni"`), and the
//! answer's value. Failures travel as [`crate::failure::Failure`] (the
//! node answers `Err(ApiError::Cni(failure))`).

use crate::result::Attached;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// One attachment, as the spec keys it: the container and its interface,
/// in a network (the conflist's name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    /// The conflist's `name`.
    pub network: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} in network {}", self.container_id, self.ifname, self.network)
    }
}

/// ADD: attach the namespace as a task of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddReq {
    /// The attachment.
    pub key: Key,
    /// `CNI_NETNS` as given (any path to a network namespace).
    pub netns: String,
    /// The service the container joins.
    pub service: String,
    /// The task's weight.
    pub weight: u32,
    /// A display name (`K8S_POD_NAME`: podman's container name).
    #[serde(default)]
    pub name: Option<String>,
    /// Seconds the node may take to make the port.
    pub timeout_secs: u64,
}

/// CHECK: the attachment's task exists and its interface is as it says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReq {
    /// The attachment.
    pub key: Key,
    /// The address of the previous result, if there was one.
    #[serde(default)]
    pub ip: Option<(Ipv4Addr, u8)>,
}

/// GC: detach this node's tasks of `network` whose attachment is not in
/// `valid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReq {
    /// The conflist's `name`.
    pub network: String,
    /// `(containerID, ifname)` pairs the runtime still has.
    pub valid: Vec<(String, String)>,
}

/// STATUS: could an ADD succeed now?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReq {
    /// The conflist's service, if it names one.
    #[serde(default)]
    pub service: Option<String>,
}

/// A CNI command for the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CniRequest {
    /// ADD.
    Add(AddReq),
    /// DEL (never needs the namespace).
    Del(Key),
    /// CHECK.
    Check(CheckReq),
    /// GC.
    Gc(GcReq),
    /// STATUS.
    Status(StatusReq),
}

/// The node's answer to a [`CniRequest`] that succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CniAnswer {
    /// ADD: what was attached.
    Added(Attached),
    /// DEL, CHECK, STATUS: done.
    Done,
    /// GC: the tasks detached.
    Removed(Vec<String>),
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json() {
        let key = Key { network: "web-net".into(), container_id: "abc".into(), ifname: "eth0".into() };
        let r = CniRequest::Add(AddReq {
            key: key.clone(),
            netns: "/proc/42/ns/net".into(),
            service: "web".into(),
            weight: 1,
            name: Some("pod-1".into()),
            timeout_secs: 10,
        });
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["add"]["key"]["container_id"], "abc");
        assert_eq!(serde_json::from_value::<CniRequest>(j).unwrap(), r);
        let d = serde_json::to_value(CniRequest::Del(key)).unwrap();
        assert_eq!(d["del"]["ifname"], "eth0");
        assert_eq!(serde_json::to_value(CniAnswer::Done).unwrap(), serde_json::json!("done"));
    }
}
