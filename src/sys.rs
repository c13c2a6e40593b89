//! The system commands a node and the lab run (`ip`, `ethtool`, `kill`,
//! …), each given as an argument vector: no command line is ever split
//! on spaces, so a name with a space in it stays one argument.

use anyhow::{Context, Result, bail};
use std::process::Command;

/// Runs `program` with `args`; its stderr in the error if it fails.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `program` with `args`; its stdout (empty if it could not start).
pub(crate) fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cores a cpu set can name (the kernel's `CPU_SETSIZE`).
const CPU_SETSIZE: usize = 1024;

/// Checks that core `c` can be named in a cpu set at all: pinning is best
/// effort (a core outside the process's mask, such as one kept with
/// `isolcpus`, is allowed and taken if the kernel lets the thread go
/// there), but a number past the set cannot be passed on.
pub(crate) fn check_core(c: usize) -> Result<()> {
    if c >= CPU_SETSIZE {
        bail!("core {c} is past what a cpu set can name (0 to {})", CPU_SETSIZE - 1);
    }
    Ok(())
}

/// Runs `ip` with `args`.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Runs `ip` with `args` in the network namespace whose file is `path`
/// (`/proc/PID/ns/net`: a namespace without a name, which `ip -n` cannot
/// enter), through util-linux's `nsenter --net=PATH`.
pub(crate) fn ip_in_netns_file(path: &str, args: &[&str]) -> Result<()> {
    let net = format!("--net={path}");
    let mut v = vec![net.as_str(), "ip"];
    v.extend_from_slice(args);
    run("nsenter", &v)
}

/// Runs `args` (a program and its arguments) in network namespace `ns`.
pub(crate) fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut v = vec!["netns", "exec", ns];
    v.extend_from_slice(args);
    ip(&v)
}

/// Turns transmit offloads off on `iface` (in `ns`, if given): for the
/// lab's underlay veths toward an AF_XDP uplink, which stand for a wire,
/// where checksums are complete (a veth leaves them partial, and AF_XDP
/// copy mode does not say so).
pub(crate) fn tx_offload_off(ns: Option<&str>, iface: &str) -> Result<()> {
    let args = ["ethtool", "-K", iface, "tx", "off"];
    match ns {
        Some(ns) => in_ns(ns, &args),
        None => run(args[0], &args[1..]),
    }
}

/// Removes interface `iface` (errors ignored: it may be gone already).
pub(crate) fn link_del(iface: &str) {
    let _ = ip(&["link", "del", iface]);
}

/// Sends `signal` (`-TERM`, `-KILL`) to `pid`; whether it was delivered.
pub(crate) fn kill(signal: &str, pid: &str) -> bool {
    Command::new("kill").args([signal, pid]).stderr(std::process::Stdio::null()).status().is_ok_and(|s| s.success())
}
