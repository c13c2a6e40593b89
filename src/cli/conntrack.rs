//! `meshplane conntrack ls`: the connections this node's workers track
//! (both directions of each), like `ipvsadm -Lnc`.

use super::args::Conn;
use super::client;
use super::render::{print, table};
use anyhow::Result;

/// Prints the tracked connections (only `service`'s, if given).
pub(crate) fn ls(c: &Conn, service: Option<&str>) -> Result<()> {
    let mut entries = client::conntrack(c)?;
    entries.retain(|e| service.is_none_or(|s| e.service.as_deref() == Some(s)));
    print(c, &entries, |v| {
        let rows = v
            .iter()
            .map(|e| {
                vec![
                    e.proto.to_uppercase(),
                    e.src.clone(),
                    e.dst.clone(),
                    e.direction.clone(),
                    e.service.clone().unwrap_or_default(),
                    e.backend.clone(),
                    e.state.clone(),
                    e.expires_in_s.to_string(),
                    e.worker.to_string(),
                ]
            })
            .collect();
        table(&["PRO", "SOURCE", "DESTINATION", "DIR", "SERVICE", "BACKEND", "STATE", "EXPIRES(S)", "WORKER"], rows);
    });
    Ok(())
}
