//! Criterion benchmarks for meshplane are the other files in `benches/`; this
//! library is empty. Run them with `cargo bench -p meshplane-benches`.
