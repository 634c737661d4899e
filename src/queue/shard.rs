//! Shuffle sharding by rendezvous (highest-random-weight) hashing.
//!
//! A tenant limited to `k` queriers is served by the `k` registered queriers with the
//! highest score `score(tenant, querier)`. Scores depend only on the two names, so when a
//! querier joins, a tenant's shard changes only if the newcomer's score beats the tenant's
//! current k-th best (on average for `k/(n+1)` of the tenants); when a querier leaves,
//! only the tenants that had it in their shard change, each swapping that one querier for
//! its next best. No other tenant moves.

/// 64-bit FNV-1a followed by a splitmix64 finaliser: stable across builds and platforms
/// (unlike `std`'s `DefaultHasher`), so every scheduler computes the same shards.
pub(crate) fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finaliser: spreads every input bit over the whole output.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The rendezvous score of a (tenant, querier) pair.
pub(crate) fn score(tenant_hash: u64, querier_hash: u64) -> u64 {
    mix(tenant_hash ^ querier_hash.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The `k` queriers (given as `(index, hash)`) with the highest score for the tenant,
/// sorted by index; `None` when `k` is 0 or covers every querier (the tenant may use all).
pub(crate) fn select(tenant_hash: u64, k: u32, queriers: &[(u32, u64)]) -> Option<Vec<u32>> {
    let k = k as usize;
    if k == 0 || k >= queriers.len() {
        return None;
    }
    let mut scored: Vec<(u64, u32)> = queriers.iter().map(|&(i, h)| (score(tenant_hash, h), i)).collect();
    // Highest scores first; ties (astronomically rare) broken by index for determinism.
    scored.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    let mut shard: Vec<u32> = scored[..k].iter().map(|&(_, i)| i).collect();
    shard.sort_unstable();
    Some(shard)
}
