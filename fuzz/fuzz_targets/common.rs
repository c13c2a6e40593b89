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

/// A worker's state for these tables with a tiny connection table (the
/// example tables have no services; a full-size table would be allocated
/// and cleared on every run, which under the sanitizer costs most of it).
pub fn worker(t: &Tables) -> WorkerState {
    WorkerState::with_conntrack(
        t.ports.len(),
        CtConfig { capacity: 8, max_new_per_sec: 0, seed: 1, ..CtConfig::default() },
    )
}
