//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
//!
//! A lookup table of `M` slots (M prime, default 65537) filled with backend
//! indices so that every backend owns a share of slots proportional to its
//! weight, and so that adding or removing one of N backends moves about 1/N
//! of the slots. Each backend walks its own permutation of the slots,
//! `offset + j·skip (mod M)`, with `offset` and `skip` hashed from the
//! backend's identity and a cluster-wide seed: every node that builds the
//! table from the same backends and seed gets the same table, so every node
//! picks the same backend for the same flow with no shared state (the
//! order in which backends are listed does not matter).
//!
//! Weights follow Katran's weighted Maglev in effect: backends take turns in
//! rounds, and a backend of weight w places w/max_weight slots per round
//! (credit carried between rounds), so shares follow the weights exactly
//! up to rounding, and equal weights give the original algorithm.
//! Weight 0 (draining) places nothing.
//!
//! Built on the control side (tables compile), read on the packet path:
//! [`Maglev::lookup`] is one multiply and one load (Lemire's multiply-shift
//! reduction instead of a division by M).

use crate::wire::flow::hash2;

/// The default table size: prime, and more than 100 × the backends of any
/// service this size is meant for (up to 655), which keeps every backend's
/// share within 1% of its ideal.
pub const DEFAULT_SIZE: u32 = 65537;

/// Largest table size accepted (a prime; 4 M slots of `u32`, 16 MiB).
pub const MAX_SIZE: u32 = 4_194_301;

/// A backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend {
    /// A stable identity of the backend (its address and port packed, for
    /// instance): the same on every node, and unchanged as long as the
    /// backend exists, so that its permutation does not change.
    pub id: u64,
    /// Relative weight; 0 places the backend in no slot.
    pub weight: u32,
}

/// Why a table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// The size is not a prime in 3..=[`MAX_SIZE`].
    #[error("maglev table size {0} must be a prime between 3 and {MAX_SIZE}")]
    BadSize(u32),
    /// Two backends have the same identity.
    #[error("maglev backend id {0:#x} appears twice")]
    DuplicateId(u64),
    /// More backends than the table has slots.
    #[error("{backends} backends do not fit a maglev table of {size} slots")]
    TooManyBackends {
        /// Backends given.
        backends: usize,
        /// Table size.
        size: u32,
    },
}

/// A built Maglev lookup table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    /// Slot → index into the backends the table was built from;
    /// [`Maglev::EMPTY`] everywhere when no backend has a weight.
    slots: Box<[u32]>,
}

impl Maglev {
    /// The slot value when no backend can be chosen.
    pub const EMPTY: u32 = u32::MAX;

    /// Builds the table of `size` slots (a prime) for `backends`, with the
    /// cluster-wide `seed`. Indices in the table are positions in
    /// `backends`.
    pub fn build(backends: &[MaglevBackend], size: u32, seed: u64) -> Result<Maglev, MaglevError> {
        if !(3..=MAX_SIZE).contains(&size) || !is_prime(size) {
            return Err(MaglevError::BadSize(size));
        }
        if backends.len() >= size as usize {
            return Err(MaglevError::TooManyBackends { backends: backends.len(), size });
        }
        let mut ids: Vec<u64> = backends.iter().map(|b| b.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(MaglevError::DuplicateId(w[0]));
        }
        let m = u64::from(size);
        let mut slots = vec![Self::EMPTY; size as usize].into_boxed_slice();
        // Turns are taken in order of identity, not of the list, so that
        // nodes that list the same backends differently build the same table.
        let mut live: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].weight > 0).collect();
        live.sort_unstable_by_key(|&i| backends[i].id);
        let Some(max_w) = live.iter().map(|&i| u64::from(backends[i].weight)).max() else {
            return Ok(Maglev { slots });
        };
        // Each live backend's permutation: offset + j * skip (mod M).
        let perm: Vec<(u64, u64)> = live
            .iter()
            .map(|&i| {
                let id = backends[i].id;
                let offset = u64::from(hash2(seed, id, 0x6f66_6673_6574)) % m; // "offset"
                let skip = u64::from(hash2(seed, id, 0x736b_6970)) % (m - 1) + 1; // "skip"
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; live.len()]; // position in each permutation
        let mut credit = vec![0u64; live.len()];
        let mut filled = 0u64;
        'fill: loop {
            for (k, &i) in live.iter().enumerate() {
                credit[k] += u64::from(backends[i].weight);
                while credit[k] >= max_w {
                    credit[k] -= max_w;
                    let (offset, skip) = perm[k];
                    // The backend's next slot not yet taken. A full
                    // permutation visits every slot (skip and M coprime),
                    // and the table is not full, so this ends.
                    let mut c = (offset + next[k] * skip) % m;
                    while slots[c as usize] != Self::EMPTY {
                        next[k] += 1;
                        c = (offset + next[k] * skip) % m;
                    }
                    slots[c as usize] = i as u32;
                    next[k] += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        Ok(Maglev { slots })
    }

    /// The backend index for a flow hash, or `None` if no backend has a
    /// weight. One multiply and one load.
    #[inline(always)]
    pub fn lookup(&self, hash: u32) -> Option<u32> {
        let i = ((u64::from(hash) * self.slots.len() as u64) >> 32) as usize;
        self.slots.get(i).copied().filter(|&b| b != Self::EMPTY)
    }

    /// Table size.
    pub fn size(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The slots (backend indices), for tests and diagnostics.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

/// Trial division: the table is built on the control side, rarely.
fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 0x5eed;

    fn backends(n: u64) -> Vec<MaglevBackend> {
        (0..n).map(|i| MaglevBackend { id: 0xc613_0000_0000 + i, weight: 1 }).collect()
    }

    fn shares(t: &Maglev, n: usize) -> Vec<usize> {
        let mut c = vec![0usize; n];
        for &s in t.slots() {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn equal_weights_balance_within_one_percent() {
        for n in [1u64, 2, 3, 10, 100, 650] {
            let t = Maglev::build(&backends(n), DEFAULT_SIZE, SEED).unwrap();
            let ideal = f64::from(DEFAULT_SIZE) / n as f64;
            for (i, &c) in shares(&t, n as usize).iter().enumerate() {
                let dev = (c as f64 - ideal).abs() / ideal;
                assert!(dev < 0.01, "n={n}: backend {i} has {c} slots, ideal {ideal:.1} ({:.2}%)", dev * 100.0);
            }
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let mut b = backends(4);
        for (x, w) in b.iter_mut().zip([1, 2, 3, 4]) {
            x.weight = w;
        }
        let t = Maglev::build(&b, DEFAULT_SIZE, SEED).unwrap();
        let s = shares(&t, 4);
        for (i, &c) in s.iter().enumerate() {
            let ideal = f64::from(DEFAULT_SIZE) * (i + 1) as f64 / 10.0;
            assert!((c as f64 - ideal).abs() / ideal < 0.01, "backend {i}: {c} slots, ideal {ideal:.0}");
        }
    }

    #[test]
    fn weight_zero_places_nothing_and_all_zero_is_empty() {
        let mut b = backends(3);
        b[1].weight = 0;
        let t = Maglev::build(&b, DEFAULT_SIZE, SEED).unwrap();
        assert_eq!(shares(&t, 3)[1], 0);
        for x in &mut b {
            x.weight = 0;
        }
        let t = Maglev::build(&b, 7, SEED).unwrap();
        assert!(t.slots().iter().all(|&s| s == Maglev::EMPTY));
        assert_eq!(t.lookup(12345), None);
        assert_eq!(Maglev::build(&[], 7, SEED).unwrap().lookup(0), None);
    }

    #[test]
    fn removing_or_adding_one_of_n_moves_about_one_nth() {
        let n = 20u64;
        let all = backends(n);
        let t = Maglev::build(&all, DEFAULT_SIZE, SEED).unwrap();
        // Remove backend 7: its slots must move, and few others.
        let fewer: Vec<MaglevBackend> = all.iter().copied().filter(|b| b.id != all[7].id).collect();
        let t2 = Maglev::build(&fewer, DEFAULT_SIZE, SEED).unwrap();
        let id = |t: &Maglev, set: &[MaglevBackend], s: usize| set[t.slots()[s] as usize].id;
        let moved = (0..DEFAULT_SIZE as usize).filter(|&s| id(&t, &all, s) != id(&t2, &fewer, s)).count();
        let frac = moved as f64 / f64::from(DEFAULT_SIZE);
        // Exactly the removed backend's share (1/N) must move; Maglev moves
        // a little more (the paper reports a few percent extra).
        assert!(frac >= 1.0 / n as f64 - 0.01, "moved {frac:.3}");
        assert!(frac < 1.5 / n as f64, "moved {frac:.3} of slots, 1/N = {:.3}", 1.0 / n as f64);
        // Adding it back restores the original table exactly.
        assert_eq!(Maglev::build(&all, DEFAULT_SIZE, SEED).unwrap(), t);
    }

    #[test]
    fn deterministic_and_independent_of_backend_order() {
        let b = backends(50);
        let a = Maglev::build(&b, DEFAULT_SIZE, SEED).unwrap();
        let again = Maglev::build(&b, DEFAULT_SIZE, SEED).unwrap();
        assert_eq!(a, again);
        // The same backends listed in another order pick the same backend
        // (by identity) for every slot.
        let mut rev = b.clone();
        rev.reverse();
        let r = Maglev::build(&rev, DEFAULT_SIZE, SEED).unwrap();
        let same = (0..DEFAULT_SIZE as usize)
            .filter(|&s| b[a.slots()[s] as usize].id == rev[r.slots()[s] as usize].id)
            .count();
        assert_eq!(same, DEFAULT_SIZE as usize);
        // Another seed gives another table.
        assert_ne!(Maglev::build(&b, DEFAULT_SIZE, SEED + 1).unwrap(), a);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(Maglev::build(&backends(2), 65536, SEED), Err(MaglevError::BadSize(65536)));
        assert_eq!(Maglev::build(&backends(2), 2, SEED), Err(MaglevError::BadSize(2)));
        assert_eq!(Maglev::build(&backends(7), 7, SEED), Err(MaglevError::TooManyBackends { backends: 7, size: 7 }));
        let mut dup = backends(3);
        dup[2].id = dup[0].id;
        assert_eq!(Maglev::build(&dup, 7, SEED), Err(MaglevError::DuplicateId(dup[0].id)));
    }

    #[test]
    fn lookup_spreads_hashes_over_the_whole_table() {
        let t = Maglev::build(&backends(3), 13, SEED).unwrap();
        assert_eq!(t.lookup(0), Some(t.slots()[0]));
        assert_eq!(t.lookup(u32::MAX), Some(t.slots()[12]));
    }
}
