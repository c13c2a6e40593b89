//! Printing: aligned columns, or JSON with `--format json`.

use super::args::{Conn, Format};
use serde_json::Value;

/// Prints rows as aligned columns.
pub(crate) fn table(head: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = w[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// A JSON value as a table cell: strings bare, null empty.
pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        x => x.to_string(),
    }
}

/// Prints `v` as JSON with `--format json`, else with `human`.
pub(crate) fn print<T: serde::Serialize>(c: &Conn, v: &T, human: impl FnOnce(&T)) {
    match c.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Format::Table => human(v),
    }
}

/// A rate with a unit prefix: 1.2 Mpps, 840 kbps.
pub(crate) fn human_rate(x: f64, unit: &str) -> String {
    let (v, p) = if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    if p.is_empty() { format!("{v:.0} {unit}") } else { format!("{v:.1} {p}{unit}") }
}

/// A count per second over `secs`: `now - before` (0 if it went down).
pub(crate) fn rate(now: u64, before: u64, secs: f64) -> f64 {
    (now - before.min(now)) as f64 / secs
}
