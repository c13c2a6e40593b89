//! What the pipeline fuzz targets share: the example tables, compiled once.

use meshplane_dataplane::lb::conntrack::CtConfig;
use meshplane_dataplane::pipeline::WorkerState;
use meshplane_dataplane::tables::Tables;
use std::sync::OnceLock;

/// `examples/tables.toml`, compiled once per process.
pub fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let spec = include_str!("../../examples/tables.toml");
        Tables::compile(&toml::from_str(spec).expect("example tables parse")).expect("example tables compile")
    })
}

/// The same tables on a node whose kernel does not hold the data-path
/// address (TAP): closed TCP ports answered with a reset.
pub fn tables_resetting() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let spec = include_str!("../../examples/tables.toml").replace("[node]", "[node]\nreset_closed_ports = true");
        Tables::compile(&toml::from_str(&spec).expect("example tables parse")).expect("example tables compile")
    })
}

/// The example tables with egress (a 64-port range, a default route, a
/// host link) and network `db` internal.
pub fn tables_egress() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let spec = include_str!("../../examples/tables.toml")
            .replace("mtu = 1400", "mtu = 1400\ninternal = true")
            .replace("vni = 4096", "vni = 4096\ndns_port = 25300")
            .replace("vni = 4097", "vni = 4097\ndns_port = 25301")
            + "\n[node.egress]\nports = \"61000-61063\"\nroute = [{ prefix = \"0.0.0.0/0\", mac = \"02:00:00:00:00:fe\" }]\n\
               [node.egress.host_link]\nip = \"198.18.99.2\"\npeer_ip = \"198.18.99.1\"\n\
               mac = \"02:4d:50:00:00:02\"\npeer_mac = \"02:4d:50:00:00:01\"\n";
        Tables::compile(&toml::from_str(&spec).expect("egress tables parse")).expect("egress tables compile")
    })
}

/// A worker's state for these tables with a tiny connection table (the
/// example tables have no services; a full-size table would be allocated
/// and cleared on every run, which under the sanitizer costs most of it).
pub fn worker(t: &Tables) -> WorkerState {
    WorkerState::with_conntrack(
        t.ports.len(),
        CtConfig { capacity: 8, max_new_per_sec: 0, seed: 1, ..CtConfig::default() },
    )
}
