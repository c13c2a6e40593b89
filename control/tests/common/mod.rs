//! What the Raft tests share: a fresh directory, and a node to add.

use meshplane_control::state::{Availability, Command, Node, Role};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// A fresh directory for test `tag` of this process.
pub(crate) fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("meshplane-raft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A command adding node `n<i>` (its addresses unique for `i` below 64 000).
pub(crate) fn add_node(i: u32) -> Command {
    Command::AddNode(Node {
        id: format!("n{i}"),
        mgmt: format!("198.18.{}.{}:2377", i / 250, i % 250 + 1).parse().unwrap(),
        data_ip: Ipv4Addr::from(0xc612_0000 + i + 1),
        data_mac: format!("02:00:00:{:02x}:{:02x}:{:02x}", i >> 16, (i >> 8) & 0xff, i & 0xff).parse().unwrap(),
        role: Role::Worker,
        availability: Availability::Active,
        key_id: None,
        underlay_mtu: 1500,
    })
}

/// Each write's node number and log index, in log order, from a stopped
/// manager's database.
pub(crate) async fn logged_writes(dir: &Path) -> Vec<(u32, u64)> {
    let store = meshplane_control::raft::Store::open(dir).expect("open");
    let all = meshplane_control::raft::LogStore::new(store)
        .entries((std::ops::Bound::Unbounded, std::ops::Bound::Unbounded))
        .await
        .expect("read");
    all.into_iter()
        .filter_map(|e| match e.payload {
            openraft::EntryPayload::Normal(Command::AddNode(n)) => Some((n.id[1..].parse().unwrap(), e.log_id.index)),
            _ => None,
        })
        .collect()
}
