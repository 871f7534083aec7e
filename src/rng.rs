//! Seeded, counter-based randomness for stochastic rounding.
//!
//! Each element draws its uniform from a hash of (stream key, element index), so the result does
//! not depend on how the work is split across threads, and the loop vectorizes (no carried state).

/// A 32-bit integer hash with good avalanche ("lowbias32", constants from Chris Wellons' search).
#[inline(always)]
pub fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// SplitMix64 finalizer: mixes a 64-bit value into 64 well-distributed bits.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of stream `stream` (e.g. a chunk index) under `seed`.
#[inline]
pub fn stream_key(seed: u64, stream: u64) -> u32 {
    (mix64(seed ^ mix64(stream.wrapping_add(0x9e37_79b9_7f4a_7c15))) >> 32) as u32
}

/// A uniform f32 in [0, 1) for element `i` of the stream with key `key` (24 random bits).
/// The SIMD kernels compute exactly this, lane by lane.
#[inline(always)]
pub fn uniform(key: u32, i: u32) -> f32 {
    (hash32(key.wrapping_add(i)) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// A fresh seed per call, for encoders given none: distinct across calls and processes. 63 bits,
/// so it is a non-negative int64 everywhere (Python, JSON, torch). The seed used is recorded in
/// the packed tensor, so any result can be reproduced.
pub fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let z = mix64(nanos ^ mix64(COUNTER.fetch_add(1, Ordering::Relaxed)))
        ^ ((std::process::id() as u64) << 32);
    z >> 1
}

/// A small sequential generator (SplitMix64) for things like sampling indices.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
    /// Uniform in 0..n (n > 0), by multiply-shift (bias below 2^-64 * n, irrelevant here).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// `n` standard normal f32 values (Box-Muller over [`SplitMix64`]): test and benchmark data
/// without another dependency.
pub fn normal_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    let mut u = || (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (0..n)
        .map(|_| {
            let (a, b) = (u().max(1e-300), u());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_in_unit_interval_and_roughly_flat() {
        let key = stream_key(42, 7);
        let n = 1 << 16;
        let mut buckets = [0u32; 16];
        for i in 0..n {
            let u = uniform(key, i);
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 16.0) as usize] += 1;
        }
        for b in buckets {
            // expected 4096 per bucket; 5 sigma is about 310
            assert!((b as i64 - 4096).abs() < 320, "bucket count {b}");
        }
    }

    #[test]
    fn streams_differ() {
        assert_ne!(stream_key(1, 0), stream_key(1, 1));
        assert_ne!(stream_key(1, 0), stream_key(2, 0));
    }

    #[test]
    fn below_stays_below() {
        let mut r = SplitMix64::new(3);
        for n in [1u64, 2, 3, 1000, u64::MAX] {
            for _ in 0..100 {
                assert!(r.below(n) < n);
            }
        }
    }
}
