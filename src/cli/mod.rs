//! The CLI's nouns that talk to the local node's admin API (its unix
//! socket in the state directory): `cluster`, `node` (besides `run`),
//! `network`, `service`, `task`, `stats`, `lb`, `conntrack`. Arguments in
//! `args`, the client in `client`, printing in `render`, one module per
//! noun. Human tables by default, `--format json` for scripts; refused
//! requests print the node's reason and exit non-zero. The counters are
//! read in the schema of `dataplane::report` (`crate::stats`). `cni`
//! installs the CNI plugin and conflists for container runtimes (files
//! only: it does not talk to the node).

pub(crate) mod args;
mod client;
pub(crate) mod cluster;
pub(crate) mod cni;
pub(crate) mod conntrack;
pub(crate) mod lb;
pub(crate) mod network;
pub(crate) mod node;
mod render;
pub(crate) mod service;
pub(crate) mod stats;
pub(crate) mod task;
