//! `meshplane service create|ls|inspect|update|rm`, and the `--publish`
//! syntax.

use super::args::{Conn, EndpointModeArg, HealthArgs, ProtoArg, SchedArg, ServiceCmd, ServiceCreate};
use super::client::{state, write};
use super::render::{print, s, table};
use anyhow::{Context, Result, anyhow, bail};
use meshplane_control::state::{Command, EndpointMode, HealthCheck, HealthUpdate, Probe, PublishRequest};
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
        ServiceCmd::Update { scheduler, health, publish_add, publish_rm, name } => {
            update(c, name, *scheduler, health, publish_add, publish_rm)
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
    let ServiceCreate { name, network, protocol, vip_port, target_port, publish, scheduler, endpoint_mode, health } = a;
    let health = match health_update(health, None)? {
        HealthUpdate::Set(h) => Some(h),
        HealthUpdate::Keep | HealthUpdate::Remove => None,
    };
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
            health,
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
    println!(
        "{name}: vip {} published {} health {}",
        vip_text(&svc["vip"]),
        if published.is_empty() { "-".to_owned() } else { published.join(", ") },
        health_text(&svc["health"])
    );
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

/// `service update`: a new scheduler, ports published or withdrawn, the
/// health check set, changed or removed.
fn update(
    c: &Conn,
    name: &String,
    scheduler: Option<SchedArg>,
    health: &HealthArgs,
    publish_add: &[String],
    publish_rm: &[u16],
) -> Result<()> {
    let st = state(c)?;
    let has: Option<HealthCheck> = serde_json::from_value(st["services"][name]["health"].clone()).unwrap_or(None);
    let health = health_update(health, has.as_ref())?;
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
    if scheduler.is_none() && add.is_empty() && publish_rm.is_empty() && health == HealthUpdate::Keep {
        bail!("nothing to change: --scheduler, --publish-add, --publish-rm, --health-* or --no-healthcheck");
    }
    write(
        c,
        Command::UpdateService {
            name: name.clone(),
            scheduler: scheduler.map(sched),
            publish_add: add,
            publish_rm: publish_rm.to_vec(),
            health,
        },
    )?;
    println!("{name}");
    Ok(())
}

/// Defaults of a new health check (Docker's are 30s, 30s, 3 and 0s: ours
/// are shorter because the balancers act on them, so that a dead task
/// leaves them within 15 s).
pub(crate) const HEALTH_INTERVAL_MS: u64 = 5_000;
/// See [`HEALTH_INTERVAL_MS`].
pub(crate) const HEALTH_TIMEOUT_MS: u64 = 2_000;
/// See [`HEALTH_INTERVAL_MS`].
pub(crate) const HEALTH_RETRIES: u32 = 3;

/// `--health-cmd`: `tcp` or `http:/PATH`.
fn parse_probe(s: &str) -> Result<Probe> {
    match s.split_once(':') {
        None if s.eq_ignore_ascii_case("tcp") => Ok(Probe::Tcp),
        Some((k, path)) if k.eq_ignore_ascii_case("http") => Ok(Probe::Http { path: path.to_owned() }),
        _ => bail!("--health-cmd {s:?}: tcp, or http:/PATH (e.g. http:/healthz)"),
    }
}

/// What the `--health-*` flags do to a service's check `has` (none for
/// `create`): nothing given keeps it; `--no-healthcheck` removes it;
/// otherwise the given fields over the check it has (or over the
/// defaults, which needs `--health-cmd`), checked as every manager checks
/// it.
fn health_update(a: &HealthArgs, has: Option<&HealthCheck>) -> Result<HealthUpdate> {
    if a.no_healthcheck {
        return Ok(HealthUpdate::Remove);
    }
    let any = a.health_interval.is_some()
        || a.health_timeout.is_some()
        || a.health_retries.is_some()
        || a.health_start_period.is_some();
    let mut h = match (&a.health_cmd, has) {
        (None, _) if !any => return Ok(HealthUpdate::Keep),
        (Some(cmd), has) => HealthCheck { probe: parse_probe(cmd)?, ..has.cloned().unwrap_or_else(default_check) },
        (None, Some(has)) => has.clone(),
        (None, None) => bail!(
            "--health-interval, --health-timeout, --health-retries and --health-start-period need --health-cmd tcp|http:/PATH"
        ),
    };
    if let Some(ms) = a.health_interval {
        h.interval_ms = ms;
        // A shorter interval than the timeout brings the timeout down
        // with it, unless one is given.
        if a.health_timeout.is_none() {
            h.timeout_ms = h.timeout_ms.min(ms);
        }
    }
    h.timeout_ms = a.health_timeout.unwrap_or(h.timeout_ms);
    h.retries = a.health_retries.unwrap_or(h.retries);
    h.start_period_ms = a.health_start_period.unwrap_or(h.start_period_ms);
    h.validate().map_err(|e| anyhow!("{e}"))?;
    Ok(HealthUpdate::Set(h))
}

fn default_check() -> HealthCheck {
    HealthCheck {
        probe: Probe::Tcp,
        interval_ms: HEALTH_INTERVAL_MS,
        timeout_ms: HEALTH_TIMEOUT_MS,
        retries: HEALTH_RETRIES,
        start_period_ms: 0,
    }
}

/// A service's health check in a line: `tcp every 5s (timeout 2s, 3
/// retries, start period 0s)`, or `none`.
fn health_text(v: &Value) -> String {
    let Ok(Some(h)) = serde_json::from_value::<Option<HealthCheck>>(v.clone()) else { return "none".into() };
    let probe = match &h.probe {
        Probe::Tcp => "tcp".to_owned(),
        Probe::Http { path } => format!("http:{path}"),
    };
    let d = |ms: u64| humantime::format_duration(std::time::Duration::from_millis(ms)).to_string();
    format!(
        "{probe} every {} (timeout {}, {} retries, start period {})",
        d(h.interval_ms),
        d(h.timeout_ms),
        h.retries,
        d(h.start_period_ms)
    )
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
            ("mode=direct,1:2", "mode \"direct\""),
            ("colour=red", "unknown key"),
            ("8080", "PUB:TARGET"),
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn flags(cmd: Option<&str>, interval: Option<u64>, timeout: Option<u64>, retries: Option<u32>) -> HealthArgs {
        HealthArgs {
            health_cmd: cmd.map(str::to_owned),
            health_interval: interval,
            health_timeout: timeout,
            health_retries: retries,
            health_start_period: None,
            no_healthcheck: false,
        }
    }

    #[test]
    fn health_flags_make_a_check_over_the_defaults_or_the_one_there_is() {
        let set = |a: &HealthArgs, has: Option<&HealthCheck>| match health_update(a, has) {
            Ok(HealthUpdate::Set(h)) => Ok(h),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        };
        let tcp = set(&flags(Some("tcp"), None, None, None), None).expect("defaults");
        assert_eq!(tcp, default_check());
        assert_eq!((tcp.interval_ms, tcp.timeout_ms, tcp.retries, tcp.start_period_ms), (5000, 2000, 3, 0));
        let h = set(&flags(Some("http:/healthz"), Some(1000), None, Some(5)), None).expect("http");
        assert_eq!(h.probe, Probe::Http { path: "/healthz".into() });
        assert_eq!((h.interval_ms, h.timeout_ms, h.retries), (1000, 1000, 5), "the timeout follows a short interval");
        // An update changes what it names and keeps the rest.
        let h2 = set(&flags(None, None, Some(300), None), Some(&h)).expect("timeout only");
        assert_eq!((h2.probe.clone(), h2.interval_ms, h2.timeout_ms, h2.retries), (h.probe.clone(), 1000, 300, 5));
        let h3 = set(&flags(Some("tcp"), None, None, None), Some(&h)).expect("probe only");
        assert_eq!((h3.probe, h3.interval_ms), (Probe::Tcp, 1000));
        assert_eq!(health_update(&flags(None, None, None, None), Some(&h)).ok(), Some(HealthUpdate::Keep));
        let off = HealthArgs { no_healthcheck: true, ..HealthArgs::default() };
        assert_eq!(health_update(&off, Some(&h)).ok(), Some(HealthUpdate::Remove));
        for (a, says) in [
            (flags(None, Some(1000), None, None), "need --health-cmd"),
            (flags(Some("curl -f localhost"), None, None, None), "tcp, or http:/PATH"),
            (flags(Some("http:healthz"), None, None, None), "starts with '/'"),
            (flags(Some("tcp"), Some(1000), Some(2000), None), "longer than its interval"),
            (flags(Some("tcp"), None, None, Some(0)), "retries 0"),
        ] {
            let e = set(&a, None).expect_err("refused");
            assert!(e.contains(says), "{a:?}: {e}");
        }
    }

    #[test]
    fn health_durations_are_written_as_dockers() {
        use super::super::args::ServiceCmd;
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: ServiceCmd,
        }
        let parse = |args: &[&str]| Cli::try_parse_from([&["x"], args].concat()).map(|c| c.cmd);
        let cmd = parse(&["update", "--health-interval", "1m30s", "--health-timeout", "500ms", "web"]).expect("parsed");
        match cmd {
            ServiceCmd::Update { health, .. } => {
                assert_eq!((health.health_interval, health.health_timeout), (Some(90_000), Some(500)));
            }
            _ => panic!("not an update"),
        }
        let e = parse(&["update", "--health-interval", "5 parsecs", "web"]).expect_err("refused").to_string();
        assert!(e.contains("e.g. 5s"), "{e}");
        let e = parse(&["update", "--no-healthcheck", "--health-cmd", "tcp", "web"]).expect_err("refused").to_string();
        assert!(e.contains("cannot be used with"), "{e}");
        assert!(health_text(&serde_json::to_value(default_check()).unwrap()).starts_with("tcp every 5s (timeout 2s"));
        assert_eq!(health_text(&Value::Null), "none");
    }
}
