//! What the plugin prints: the ADD result in the shape of the version
//! asked (1.1.0 and 1.0.0 differ from 0.4.0), error objects, VERSION's
//! answer.

use crate::SUPPORTED;
use crate::failure::{Failure, STATUS_CODE};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::net::Ipv4Addr;

/// What the node attached: the facts an ADD result reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// The host end of the task's port, if it has one (AF_XDP: a veth).
    pub host_iface: Option<String>,
    /// The interface in the container.
    pub ifname: String,
    /// Its MAC.
    pub mac: String,
    /// Its MTU.
    pub mtu: u16,
    /// Its address and prefix.
    pub ip: (Ipv4Addr, u8),
    /// The network's gateway (the default route, and the resolver).
    pub gateway: Ipv4Addr,
    /// DNS: the search domains, when the node serves DNS for the network.
    pub dns: Option<Vec<String>>,
}

/// The ADD result for `version` (one of [`SUPPORTED`]) with `sandbox`
/// (`CNI_NETNS` as given).
pub fn add_result(version: &str, a: &Attached, sandbox: &str) -> Value {
    let mut interfaces = Vec::new();
    if let Some(h) = &a.host_iface {
        interfaces.push(json!({ "name": h }));
    }
    let index = interfaces.len();
    let mut inside = Map::new();
    inside.insert("name".into(), json!(a.ifname));
    inside.insert("mac".into(), json!(a.mac));
    inside.insert("sandbox".into(), json!(sandbox));
    if version == "1.1.0" {
        inside.insert("mtu".into(), json!(a.mtu));
    }
    interfaces.push(Value::Object(inside));
    let mut ip = Map::new();
    ip.insert("address".into(), json!(format!("{}/{}", a.ip.0, a.ip.1)));
    ip.insert("gateway".into(), json!(a.gateway.to_string()));
    ip.insert("interface".into(), json!(index));
    if version == "0.4.0" {
        ip.insert("version".into(), json!("4"));
    }
    let mut r = Map::new();
    r.insert("cniVersion".into(), json!(version));
    r.insert("interfaces".into(), Value::Array(interfaces));
    r.insert("ips".into(), Value::Array(vec![Value::Object(ip)]));
    r.insert("routes".into(), json!([{ "dst": "0.0.0.0/0", "gw": a.gateway.to_string() }]));
    if let Some(search) = &a.dns {
        r.insert(
            "dns".into(),
            json!({ "nameservers": [a.gateway.to_string()], "search": search, "options": ["ndots:0"] }),
        );
    }
    Value::Object(r)
}

/// The error object of `f` (`version`: the configuration's, if it was
/// read, else the newest).
pub fn error_json(version: Option<&str>, f: &Failure) -> Value {
    json!({ "cniVersion": version.unwrap_or("1.1.0"), "code": f.code(), "msg": f.to_string() })
}

/// STATUS's error object for `f`: code [`STATUS_CODE`] whatever the
/// cause, with the cause's message, and its own code in `details`.
pub fn status_error_json(version: Option<&str>, f: &Failure) -> Value {
    json!({
        "cniVersion": version.unwrap_or("1.1.0"),
        "code": STATUS_CODE,
        "msg": f.to_string(),
        "details": format!("meshplane could not serve an ADD now (code {})", f.code()),
    })
}

/// VERSION's answer to a configuration of `asked` (any string: VERSION
/// answers even a version it does not speak, with the versions it does).
pub fn version_json(asked: Option<&str>) -> Value {
    json!({ "cniVersion": asked.unwrap_or("1.1.0"), "supportedVersions": SUPPORTED })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::conf::{NetConf, Params, service};

    fn attached(host: Option<&str>, dns: bool) -> Attached {
        Attached {
            host_iface: host.map(str::to_owned),
            ifname: "eth0".into(),
            mac: "02:42:c6:13:00:05".into(),
            mtu: 1450,
            ip: (Ipv4Addr::new(198, 19, 0, 5), 24),
            gateway: Ipv4Addr::new(198, 19, 0, 254),
            dns: dns.then(|| vec!["example.com".to_owned()]),
        }
    }

    #[test]
    fn the_add_result_takes_the_shape_of_the_version_asked() {
        let r = add_result("1.1.0", &attached(Some("mpt1c9e0f3a"), true), "/run/netns/x");
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [{ "name": "mpt1c9e0f3a" },
                               { "name": "eth0", "mac": "02:42:c6:13:00:05", "sandbox": "/run/netns/x", "mtu": 1450 }],
                "ips": [{ "address": "198.19.0.5/24", "gateway": "198.19.0.254", "interface": 1 }],
                "routes": [{ "dst": "0.0.0.0/0", "gw": "198.19.0.254" }],
                "dns": { "nameservers": ["198.19.0.254"], "search": ["example.com"], "options": ["ndots:0"] }
            })
        );
        // 1.0.0: no mtu; TAP (no host end): the container's is interface 0;
        // no DNS when the node serves none.
        let r = add_result("1.0.0", &attached(None, false), "/proc/42/ns/net");
        assert_eq!(
            r["interfaces"],
            json!([{ "name": "eth0", "mac": "02:42:c6:13:00:05", "sandbox": "/proc/42/ns/net" }])
        );
        assert_eq!(r["ips"][0]["interface"], 0);
        assert!(r.get("dns").is_none());
        // 0.4.0: each address says its IP version.
        assert_eq!(add_result("0.4.0", &attached(None, false), "/x")["ips"][0]["version"], "4");
    }

    #[test]
    fn errors_carry_the_specs_codes_and_a_message_to_act_on() {
        let e = error_json(Some("1.0.0"), &Failure::UnknownService("wbe".into()));
        assert_eq!((e["cniVersion"].as_str(), e["code"].as_u64()), (Some("1.0.0"), Some(100)));
        assert!(e["msg"].as_str().unwrap().contains("service \"wbe\" does not exist"));
        assert_eq!(error_json(None, &Failure::Later("node down".into()))["code"], 11);
        let s = status_error_json(Some("1.1.0"), &Failure::Later("node down".into()));
        assert_eq!((s["code"].as_u64(), s["msg"].as_str()), (Some(50), Some("node down")));
        assert!(s["details"].as_str().unwrap().contains("code 11"), "{s}");
        assert_eq!(version_json(Some("0.3.1")), json!({ "cniVersion": "0.3.1", "supportedVersions": SUPPORTED }));
    }

    fn conf(extra: &str) -> Result<NetConf, Failure> {
        NetConf::parse(
            format!("{{\"cniVersion\":\"1.0.0\",\"name\":\"web-net\",\"type\":\"meshplane\"{extra}}}").as_bytes(),
        )
    }

    fn params(args: &str) -> Params {
        let env = |k: &str| match k {
            "CNI_COMMAND" => Some("ADD".to_owned()),
            "CNI_CONTAINERID" => Some("abc123".to_owned()),
            "CNI_NETNS" => Some("/run/netns/x".to_owned()),
            "CNI_IFNAME" => Some("eth0".to_owned()),
            "CNI_ARGS" => Some(args.to_owned()),
            _ => None,
        };
        Params::from_env(&env).expect("params")
    }

    #[test]
    fn the_service_comes_from_the_conflist_or_what_it_allows() {
        let c = conf(",\"service\":\"web\",\"services\":[\"api\"]").unwrap();
        assert_eq!(service(&c, &params("IgnoreUnknown=1;K8S_POD_NAME=p")).unwrap(), "web");
        assert_eq!(service(&c, &params("MESHPLANE_SERVICE=api")).unwrap(), "api");
        let e = service(&c, &params("MESHPLANE_SERVICE=db")).unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("service \"db\" (from CNI_ARGS MESHPLANE_SERVICE) is not allowed"), "{e}");
        let ip = service(&c, &params("IP=198.19.0.9")).unwrap_err();
        assert_eq!(ip.code(), 2);
        let none = service(&conf("").unwrap(), &params("")).unwrap_err();
        assert!(none.to_string().contains("network web-net names no service"), "{none}");
        let any = conf(",\"services\":[\"*\"],\"runtimeConfig\":{\"io.kubernetes.cri.pod-annotations\":{\"meshplane.io/service\":\"db\"}}").unwrap();
        assert_eq!(service(&any, &params("")).unwrap(), "db");
    }

    #[test]
    fn bad_configurations_and_environments_get_their_codes() {
        assert_eq!(conf(",").unwrap_err().code(), 6, "not JSON");
        assert_eq!(
            NetConf::parse(b"{\"cniVersion\":\"0.3.1\",\"name\":\"n\",\"type\":\"meshplane\"}").unwrap_err().code(),
            1
        );
        assert_eq!(conf(",\"ipam\":{\"type\":\"host-local\"}").unwrap_err().code(), 2);
        assert_eq!(conf(",\"socket\":\"admin.sock\"").unwrap_err().code(), 7);
        assert_eq!(conf(",\"timeoutSecs\":0").unwrap_err().code(), 7);
        let big = vec![b' '; crate::conf::MAX_CONF + 1];
        assert_eq!(NetConf::parse(&big).unwrap_err().code(), 6);
        let env = |bad: (&'static str, &'static str)| {
            move |k: &str| {
                if k == bad.0 {
                    return Some(bad.1.to_owned());
                }
                (k == "CNI_COMMAND").then(|| "ADD".to_owned())
            }
        };
        for bad in [
            ("CNI_IFNAME", "eth 0"),
            ("CNI_IFNAME", "a-very-long-name"),
            ("CNI_CONTAINERID", "-x"),
            ("CNI_ARGS", "K8S"),
        ] {
            let e = Params::from_env(&env(bad)).unwrap_err();
            assert_eq!(e.code(), 4, "{bad:?}");
            assert!(e.to_string().starts_with(bad.0), "{e}");
        }
        assert_eq!(Params::from_env(&|_: &str| None).unwrap_err().code(), 4, "no CNI_COMMAND");
        // containerd's DEL: an empty CNI_NETNS is no namespace.
        let del = |k: &str| match k {
            "CNI_COMMAND" => Some("DEL".to_owned()),
            "CNI_NETNS" => Some(String::new()),
            _ => None,
        };
        let p = Params::from_env(&del).unwrap();
        assert_eq!(p.netns, None);
        assert_eq!(p.need(&p.container_id, "CNI_CONTAINERID").unwrap_err().code(), 4);
    }
}
