//! Schedulers: which backend a new connection goes to, as IPVS chooses
//! (`rr`, `wrr`, `lc`, `wlc`, `sh`) and Maglev (`mh`).
//!
//! `sh` and `mh` are stateless and the same on every node (Maglev tables
//! built from the same backends and cluster seed): `sh` hashes the source
//! address only (a client sticks to one backend), `mh` the whole 5-tuple.
//! `rr`, `wrr`, `lc` and `wlc` keep state per worker ([`SchedState`]) and
//! count connections per worker: like IPVS on each Swarm node, every worker
//! balances on its own. Backends of weight 0 (draining) get no new
//! connections from any scheduler.

use crate::tables::maglev::Maglev;
pub use crate::tables::services::Scheduler;

/// Per-worker scheduling state of one service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedState {
    /// rr/wrr: the backend chosen last (`usize::MAX` before the first).
    last: Option<usize>,
    /// wrr: the current weight.
    cw: u32,
}

/// What the schedulers need to know of a service's backends, by index.
pub trait Backends {
    /// Number of backends.
    fn count(&self) -> usize;
    /// Weight of backend `i` (0: draining, no new connections).
    fn weight(&self, i: usize) -> u32;
    /// Connections this worker has open to backend `i` (for `lc`/`wlc`).
    fn active(&self, i: usize) -> u32;
}

/// Picks a backend index for a new connection, or `None` when no backend
/// has a weight. `flow_hash` is the 5-tuple hash (`mh`), `src_hash` the
/// hash of the source address only (`sh`); `maglev` is the service's table
/// (ignored by the other schedulers).
pub fn pick<B: Backends + ?Sized>(
    sched: Scheduler,
    b: &B,
    st: &mut SchedState,
    maglev: Option<&Maglev>,
    flow_hash: u32,
    src_hash: u32,
) -> Option<usize> {
    let n = b.count();
    match sched {
        Scheduler::Mh => maglev?.lookup(flow_hash).map(|i| i as usize),
        Scheduler::Sh => maglev?.lookup(src_hash).map(|i| i as usize),
        Scheduler::Rr => {
            let start = st.last.map_or(0, |l| l + 1);
            let i = (0..n).map(|k| (start + k) % n).find(|&i| b.weight(i) > 0)?;
            st.last = Some(i);
            Some(i)
        }
        Scheduler::Wrr => {
            // IPVS's interleaved weighted round robin: walk the backends,
            // lowering the current weight by the gcd after each lap, and take
            // the next one whose weight reaches it.
            let max = (0..n).map(|i| b.weight(i)).max().filter(|&m| m > 0)?;
            let g = (0..n).map(|i| b.weight(i)).filter(|&w| w > 0).fold(0, gcd);
            let mut i = st.last.unwrap_or(n - 1);
            // At most one full cycle of current weights over all backends.
            for _ in 0..=(n * (max / g) as usize) {
                i = (i + 1) % n;
                if i == 0 {
                    st.cw = if st.cw <= g { max } else { st.cw - g };
                }
                if b.weight(i) >= st.cw && b.weight(i) > 0 {
                    st.last = Some(i);
                    return Some(i);
                }
            }
            None
        }
        Scheduler::Lc => (0..n).filter(|&i| b.weight(i) > 0).min_by_key(|&i| b.active(i)),
        Scheduler::Wlc => {
            // Least active / weight, compared without division: a_i·w_j < a_j·w_i.
            let mut best: Option<usize> = None;
            for i in (0..n).filter(|&i| b.weight(i) > 0) {
                let better = match best {
                    None => true,
                    Some(j) => {
                        u64::from(b.active(i)) * u64::from(b.weight(j))
                            < u64::from(b.active(j)) * u64::from(b.weight(i))
                    }
                };
                if better {
                    best = Some(i);
                }
            }
            best
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::maglev::{DEFAULT_SIZE, MaglevBackend};

    #[derive(Debug, Clone, Copy)]
    struct B {
        w: u32,
        a: u32,
    }
    struct Bs<'a>(&'a [B]);
    impl Backends for Bs<'_> {
        fn count(&self) -> usize {
            self.0.len()
        }
        fn weight(&self, i: usize) -> u32 {
            self.0[i].w
        }
        fn active(&self, i: usize) -> u32 {
            self.0[i].a
        }
    }

    fn bs(w: &[u32]) -> Vec<B> {
        w.iter().map(|&w| B { w, a: 0 }).collect()
    }

    fn pick(s: Scheduler, b: &[B], st: &mut SchedState, m: Option<&Maglev>, fh: u32, sh: u32) -> Option<usize> {
        super::pick(s, &Bs(b), st, m, fh, sh)
    }

    fn seq(s: Scheduler, b: &[B], n: usize) -> Vec<usize> {
        let mut st = SchedState::default();
        (0..n).map(|_| pick(s, b, &mut st, None, 0, 0).unwrap()).collect()
    }

    #[test]
    fn rr_cycles_in_order_skipping_drained() {
        assert_eq!(seq(Scheduler::Rr, &bs(&[1, 1, 1]), 7), [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(seq(Scheduler::Rr, &bs(&[1, 0, 5]), 4), [0, 2, 0, 2]);
        let mut st = SchedState::default();
        assert_eq!(pick(Scheduler::Rr, &bs(&[0, 0]), &mut st, None, 0, 0), None);
        assert_eq!(pick(Scheduler::Rr, &bs(&[]), &mut st, None, 0, 0), None);
    }

    #[test]
    fn wrr_follows_ipvs_interleaving_and_ratios() {
        // IPVS's documented example: weights 4, 3, 2 give AABABCABC.
        assert_eq!(seq(Scheduler::Wrr, &bs(&[4, 3, 2]), 9), [0, 0, 1, 0, 1, 2, 0, 1, 2]);
        let s = seq(Scheduler::Wrr, &bs(&[5, 0, 1, 2]), 8 * 100);
        let count = |i| s.iter().filter(|&&x| x == i).count();
        assert_eq!([count(0), count(1), count(2), count(3)], [500, 0, 100, 200]);
        let mut st = SchedState::default();
        assert_eq!(pick(Scheduler::Wrr, &bs(&[0, 0]), &mut st, None, 0, 0), None);
    }

    #[test]
    fn lc_and_wlc_choose_the_least_loaded() {
        let b = [B { w: 1, a: 5 }, B { w: 1, a: 2 }, B { w: 0, a: 0 }, B { w: 1, a: 3 }];
        let mut st = SchedState::default();
        assert_eq!(pick(Scheduler::Lc, &b, &mut st, None, 0, 0), Some(1));
        // wlc: 6/3 = 2 beats 3/1 = 3 and 5/2 = 2.5.
        let b = [B { w: 2, a: 5 }, B { w: 1, a: 3 }, B { w: 3, a: 6 }, B { w: 0, a: 0 }];
        assert_eq!(pick(Scheduler::Wlc, &b, &mut st, None, 0, 0), Some(2));
        // Ties go to the first.
        assert_eq!(pick(Scheduler::Lc, &bs(&[1, 1]), &mut st, None, 0, 0), Some(0));
        assert_eq!(pick(Scheduler::Wlc, &bs(&[0, 0]), &mut st, None, 0, 0), None);
    }

    #[test]
    fn sh_is_stable_per_source_and_mh_per_flow() {
        let mb: Vec<MaglevBackend> = (0..5).map(|i| MaglevBackend { id: i, weight: 1 }).collect();
        let m = Maglev::build(&mb, DEFAULT_SIZE, 1).unwrap();
        let b = bs(&[1; 5]);
        let mut st = SchedState::default();
        let first = pick(Scheduler::Sh, &b, &mut st, Some(&m), 1, 0xdead_beef);
        // Any flow from the same source goes to the same backend.
        for flow in 0..100 {
            assert_eq!(pick(Scheduler::Sh, &b, &mut st, Some(&m), flow, 0xdead_beef), first);
        }
        assert_eq!(pick(Scheduler::Mh, &b, &mut st, Some(&m), 0xdead_beef, 7), first);
        // Different sources spread over every backend.
        let mut seen = [false; 5];
        for src in 0..1000u32 {
            seen[pick(Scheduler::Sh, &b, &mut st, Some(&m), 0, src.wrapping_mul(0x9e37_79b9)).unwrap()] = true;
        }
        assert_eq!(seen, [true; 5]);
        assert_eq!(pick(Scheduler::Mh, &b, &mut st, None, 0, 0), None, "no table, no choice");
    }
}
