//! The CNI plugin's parsers over arbitrary bytes: the input is split at
//! NUL bytes into the network configuration (stdin), `CNI_ARGS`,
//! `CNI_IFNAME`, `CNI_CONTAINERID` and `CNI_NETNS`. The configuration and
//! environment are checked (`NetConf::parse`, `Params::from_env`), the
//! service chosen, and an ADD result and an error object made for the
//! version asked; VERSION runs through the plugin's own entry point (it
//! never contacts a node). No panic; every failure has a code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshplane_cni::conf::{NetConf, Params, service};
use meshplane_cni::result::{Attached, add_result, error_json};
use std::net::Ipv4Addr;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let stdin = parts.next().unwrap_or_default();
    let text = |p: Option<&[u8]>| p.map(|b| String::from_utf8_lossy(b).into_owned());
    let (args, ifname, id, netns) = (text(parts.next()), text(parts.next()), text(parts.next()), text(parts.next()));
    let var = |k: &str| match k {
        "CNI_COMMAND" => Some("ADD".to_owned()),
        "CNI_ARGS" => args.clone(),
        "CNI_IFNAME" => ifname.clone(),
        "CNI_CONTAINERID" => id.clone(),
        "CNI_NETNS" => netns.clone(),
        _ => None,
    };
    let conf = NetConf::parse(stdin);
    let params = Params::from_env(&var);
    if let (Ok(c), Ok(p)) = (&conf, &params) {
        let chosen = service(c, p);
        if let Err(f) = &chosen {
            assert!(f.code() > 0);
        }
        let a = Attached {
            host_iface: id.clone(),
            ifname: ifname.clone().unwrap_or_default(),
            mac: "02:42:c6:13:00:05".into(),
            mtu: 1450,
            ip: (Ipv4Addr::new(198, 19, 0, 5), 24),
            gateway: Ipv4Addr::new(198, 19, 0, 254),
            dns: chosen.ok().map(|s| vec![s]),
        };
        let r = add_result(&c.cni_version, &a, netns.as_deref().unwrap_or_default());
        assert_eq!(r["cniVersion"], c.cni_version.as_str());
    }
    for f in [conf.err(), params.err()].into_iter().flatten() {
        let e = error_json(None, &f);
        assert_eq!(e["code"], f.code());
    }
    let version = |k: &str| (k == "CNI_COMMAND").then(|| "VERSION".to_owned());
    let mut out = Vec::new();
    assert_eq!(meshplane_cni::plugin::run(&version, stdin, &mut out, std::io::sink()), 0);
    assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok(), "VERSION prints JSON");
});
