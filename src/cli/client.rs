//! The admin client: one request to the local node's admin API (its unix
//! socket in the state directory), and the typed answers.

use super::args::Conn;
use crate::stats::{AdminStats, ConntrackEntry, from_value};
use anyhow::{Context, Result, anyhow};
use meshplane_control::cluster::{AdminRequest, admin_call};
use meshplane_control::state::Command;
use serde_json::Value;

/// Sends `req`; the node's answer, or its reason for refusing.
pub(crate) fn call(c: &Conn, req: AdminRequest) -> Result<Value> {
    let sock = c.state_dir.join("admin.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let r = rt
        .block_on(admin_call(&sock, &req))
        .with_context(|| format!("talking to the node at {} (is `meshplane node run` running?)", sock.display()))?;
    r.map_err(|e| anyhow!("{e}"))
}

/// A change to the cluster state.
pub(crate) fn write(c: &Conn, command: Command) -> Result<()> {
    call(c, AdminRequest::Write { command }).map(|_| ())
}

/// The cluster state (without secrets) as this node knows it.
pub(crate) fn state(c: &Conn) -> Result<Value> {
    Ok(call(c, AdminRequest::State)?["state"].take())
}

/// The node's counters.
pub(crate) fn stats(c: &Conn) -> Result<AdminStats> {
    from_value("stats", call(c, AdminRequest::Stats)?)
}

/// The connections the node's workers track.
pub(crate) fn conntrack(c: &Conn) -> Result<Vec<ConntrackEntry>> {
    from_value("conntrack", call(c, AdminRequest::Conntrack)?)
}
