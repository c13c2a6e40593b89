//! What the pipeline fuzz targets share: the example tables, compiled once.

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
