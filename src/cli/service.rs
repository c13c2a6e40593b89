//! `meshplane service create|ls|inspect|update|rm`, and the `--publish`
//! syntax.

use super::args::{Conn, EndpointModeArg, ProtoArg, SchedArg, ServiceCmd, ServiceCreate};
use super::client::{state, write};
use super::render::{print, s, table};
use anyhow::{Context, Result, anyhow, bail};
use meshplane_control::state::{Command, EndpointMode, PublishRequest};
use meshplane_dataplane::lb::sched::Scheduler;
use meshplane_dataplane::tables::services::{MeshMode, Proto};
use serde_json::Value;

/// `[mode=nat|preserve-source,]PUB:TARGET` (also `published=`, `target=`
/// keys, and `:TARGET` for an auto-assigned port): the request and the
/// target port.
fn parse_publish(spec: &str) -> Result<(PublishRequest, Option<u16>)> {
    let (mut mode, mut port, mut target) = (MeshMode::Nat, None, None);
    let num = |x: &str, what: &str| -> Result<u16> {
        x.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| anyhow!("--publish {spec:?}: bad {what} port {x:?}"))
    };
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("mode", "nat" | "ingress")) => mode = MeshMode::Nat,
            Some(("mode", "preserve-source")) => mode = MeshMode::PreserveSource,
            Some(("mode", "host")) => mode = MeshMode::Host,
            Some(("mode", m)) => bail!("--publish {spec:?}: mode {m:?} (nat, preserve-source or host)"),
            Some(("published", p)) => port = Some(num(p, "published")?),
            Some(("target", p)) => target = Some(num(p, "target")?),
            Some((k, _)) => bail!("--publish {spec:?}: unknown key {k:?}"),
            None => match part.split_once(':') {
                Some(("", t)) => target = Some(num(t, "target")?),
                Some((p, t)) => {
                    port = Some(num(p, "published")?);
                    target = Some(num(t, "target")?);
                }
                None => bail!("--publish {spec:?}: expected PUB:TARGET"),
            },
        }
    }
    Ok((PublishRequest { port, mode }, target))
}

/// Runs a `service` command.
pub(crate) fn run(c: &Conn, cmd: &ServiceCmd) -> Result<()> {
    match cmd {
        ServiceCmd::Create(a) => create(c, a),
        ServiceCmd::Ls => ls(c),
        ServiceCmd::Inspect { name } => inspect(c, name),
        ServiceCmd::Update { scheduler, publish_add, publish_rm, name } => {
            update(c, name, *scheduler, publish_add, publish_rm)
        }
        ServiceCmd::Rm { name } => {
            write(c, Command::RemoveService { name: name.clone() })?;
            println!("{name}");
            Ok(())
        }
    }
}

/// `service create`: the service, then its VIP and published ports as
/// the state has them.
fn create(c: &Conn, a: &ServiceCreate) -> Result<()> {
    let ServiceCreate { name, network, protocol, vip_port, target_port, publish, scheduler, endpoint_mode } = a;
    let mut target = *target_port;
    let mut reqs = Vec::new();
    for p in publish {
        let (r, t) = parse_publish(p)?;
        if let (Some(a), Some(b)) = (target, t)
            && a != b
        {
            bail!("--publish {p:?}: target port {b} differs from {a} (a service has one target port)");
        }
        target = target.or(t);
        reqs.push(r);
    }
    let target_port = target.context("the tasks' port: --target-port or --publish PUB:TARGET")?;
    let endpoint_mode = match endpoint_mode {
        EndpointModeArg::Vip => EndpointMode::Vip,
        EndpointModeArg::Dnsrr => EndpointMode::Dnsrr,
    };
    match endpoint_mode {
        EndpointMode::Dnsrr if vip_port.is_some() => {
            bail!("--vip-port needs --endpoint-mode vip (dnsrr answers DNS with the tasks' addresses and has no VIP)");
        }
        EndpointMode::Dnsrr if reqs.iter().any(|r| r.mode != MeshMode::Host) => {
            bail!(
                "endpoint mode dnsrr cannot be published through the routing mesh: it has no VIP (as in Swarm); use --endpoint-mode vip, or --publish mode=host,PUB:TARGET"
            );
        }
        _ => {}
    }
    let protocol = match protocol {
        ProtoArg::Tcp => Proto::Tcp,
        ProtoArg::Udp => Proto::Udp,
    };
    let scheduler = sched(*scheduler);
    write(
        c,
        Command::CreateService {
            name: name.clone(),
            network: network.clone(),
            protocol,
            vip_port: *vip_port,
            target_port,
            publish: reqs,
            scheduler,
            endpoint_mode,
        },
    )?;
    let st = state(c)?;
    let svc = &st["services"][name];
    let published: Vec<String> = svc["published"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}->{target_port} ({})", s(&p["port"]), s(&p["mode"])))
        .collect();
    println!("{name}: vip {} published {}", vip_text(&svc["vip"]), published.join(", "));
    Ok(())
}

/// `service ls`.
fn ls(c: &Conn) -> Result<()> {
    let st = state(c)?;
    print(c, &st["services"], |v| {
        let rows = v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, sv)| {
                let tasks = st["tasks"]
                    .as_object()
                    .map_or(0, |t| t.values().filter(|t| t["service"] == Value::String(k.clone())).count());
                let published: Vec<String> = sv["published"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("*:{}->{}/{}", s(&p["port"]), s(&sv["target_port"]), s(&p["mode"])))
                    .collect();
                vec![
                    k.clone(),
                    s(&sv["network"]),
                    s(&sv["protocol"]),
                    vip_text(&sv["vip"]),
                    tasks.to_string(),
                    s(&sv["scheduler"]),
                    sv["endpoint_mode"].as_str().unwrap_or("vip").to_owned(),
                    published.join(" "),
                ]
            })
            .collect();
        table(&["NAME", "NETWORK", "PROTO", "VIP", "TASKS", "SCHED", "MODE", "PORTS"], rows);
    });
    Ok(())
}

/// `service inspect`: the service with its tasks.
fn inspect(c: &Conn, name: &String) -> Result<()> {
    let st = state(c)?;
    let mut sv = st["services"].get(name).cloned().ok_or_else(|| anyhow!("no service {name:?}"))?;
    let tasks: Vec<Value> = st["tasks"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, t)| t["service"] == Value::String(name.clone()))
        .map(|(_, t)| t.clone())
        .collect();
    sv["tasks"] = Value::Array(tasks);
    println!("{}", serde_json::to_string_pretty(&sv)?);
    Ok(())
}

/// `service update`: a new scheduler, ports published or withdrawn.
fn update(
    c: &Conn,
    name: &String,
    scheduler: Option<SchedArg>,
    publish_add: &[String],
    publish_rm: &[u16],
) -> Result<()> {
    let st = state(c)?;
    let target = st["services"][name]["target_port"].as_u64();
    let mut add = Vec::new();
    for p in publish_add {
        let (r, t) = parse_publish(p)?;
        if let (Some(t), Some(want)) = (t, target)
            && u64::from(t) != want
        {
            bail!("--publish-add {p:?}: the service's target port is {want}, not {t}");
        }
        add.push(r);
    }
    if scheduler.is_none() && add.is_empty() && publish_rm.is_empty() {
        bail!("nothing to change: --scheduler, --publish-add or --publish-rm");
    }
    write(
        c,
        Command::UpdateService {
            name: name.clone(),
            scheduler: scheduler.map(sched),
            publish_add: add,
            publish_rm: publish_rm.to_vec(),
        },
    )?;
    println!("{name}");
    Ok(())
}

fn sched(s: SchedArg) -> Scheduler {
    match s {
        SchedArg::Mh => Scheduler::Mh,
        SchedArg::Rr => Scheduler::Rr,
        SchedArg::Wrr => Scheduler::Wrr,
        SchedArg::Lc => Scheduler::Lc,
        SchedArg::Wlc => Scheduler::Wlc,
        SchedArg::Sh => Scheduler::Sh,
    }
}

fn vip_text(v: &Value) -> String {
    match v.as_array() {
        // Port 0: every port (untranslated).
        Some(a) if a.len() == 2 && a[1] == 0 => format!("{}:*", s(&a[0])),
        Some(a) if a.len() == 2 => format!("{}:{}", s(&a[0]), s(&a[1])),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs() {
        let p = |s: &str| parse_publish(s).map(|(r, t)| (r.port, r.mode, t)).map_err(|e| e.to_string());
        assert_eq!(p("30080:8080"), Ok((Some(30080), MeshMode::Nat, Some(8080))));
        assert_eq!(p("mode=preserve-source,30081:8080"), Ok((Some(30081), MeshMode::PreserveSource, Some(8080))));
        assert_eq!(p("published=30082,target=80,mode=ingress"), Ok((Some(30082), MeshMode::Nat, Some(80))));
        assert_eq!(p(":8080"), Ok((None, MeshMode::Nat, Some(8080))));
        assert_eq!(p("mode=host,30083:80"), Ok((Some(30083), MeshMode::Host, Some(80))));
        for (bad, says) in [
            ("70000:80", "bad published port"),
            ("30080:0", "bad target port"),
            ("mode=host,1:2", "mode \"host\""),
            ("colour=red", "unknown key"),
            ("8080", "PUB:TARGET"),
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
