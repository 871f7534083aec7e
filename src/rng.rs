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

/// A uniform f32 in (0, 1) for element `i` of the stream with key `key`: 16 random bits, at the
/// centres of 2^16 equal steps ((b + 1/2) / 2^16, so its mean is exactly 1/2). Each hash serves
/// two elements: `i` and `i ^ 16` take the low and the high half of the hash of counter
/// [`pair_counter`]`(i)`, so a SIMD kernel codes 32 consecutive elements (from a multiple of
/// 32) with sixteen hashes. The kernels compute exactly this, lane by lane.
#[inline(always)]
pub fn uniform(key: u32, i: u32) -> f32 {
    let h = hash32(key.wrapping_add(pair_counter(i)));
    let b = if i & 16 == 0 { h & 0xffff } else { h >> 16 };
    // (2b + 1) / 2^17: exact in f32 (18 significant bits at most).
    (2 * b + 1) as f32 * (1.0 / 131_072.0)
}

/// The hash counter of element `i` in [`uniform`]: elements `i` and `i ^ 16` share it, and no
/// other element does.
#[inline(always)]
pub fn pair_counter(i: u32) -> u32 {
    (i >> 1 & !15) | (i & 15)
}

/// [`uniform`] of eight elements at once: `key` and the element indices `idx` in every lane.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn uniform8(
    key: std::arch::x86_64::__m256i,
    idx: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let pair = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi32::<1>(idx), _mm256_set1_epi32(!15)),
        _mm256_and_si256(idx, _mm256_set1_epi32(15)),
    );
    let mut h = _mm256_add_epi32(key, pair);
    h = _mm256_xor_si256(h, _mm256_srli_epi32::<16>(h));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x7feb_352d));
    h = _mm256_xor_si256(h, _mm256_srli_epi32::<15>(h));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x846c_a68b_u32 as i32));
    h = _mm256_xor_si256(h, _mm256_srli_epi32::<16>(h));
    // The high half where bit 4 of the index is set, else the low half.
    let high = _mm256_cmpeq_epi32(
        _mm256_and_si256(idx, _mm256_set1_epi32(16)),
        _mm256_set1_epi32(16),
    );
    let b = _mm256_blendv_epi8(
        _mm256_and_si256(h, _mm256_set1_epi32(0xffff)),
        _mm256_srli_epi32::<16>(h),
        high,
    );
    let odd = _mm256_or_si256(_mm256_slli_epi32::<1>(b), _mm256_set1_epi32(1));
    _mm256_mul_ps(_mm256_cvtepi32_ps(odd), _mm256_set1_ps(1.0 / 131_072.0))
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
    fn pairs_share_a_hash_and_nothing_else_does() {
        let mut seen = std::collections::HashMap::new();
        for i in 0..4096u32 {
            let c = pair_counter(i);
            if let Some(j) = seen.insert(c, i) {
                assert_eq!(j, i ^ 16, "counter {c}: elements {j} and {i}");
            }
        }
        assert_eq!(seen.len(), 2048);
        // Both halves are drawn: over pairs, the low and high halves are not the same values.
        let key = stream_key(5, 1);
        let same = (0..16u32)
            .filter(|&i| uniform(key, i) == uniform(key, i ^ 16))
            .count();
        assert!(same < 2);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn uniform8_is_uniform_lane_by_lane() {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        for key in [0u32, 7, stream_key(3, 9), u32::MAX] {
            for start in (0..200u32).chain([u32::MAX - 40]).step_by(3) {
                let idx: [u32; 8] = std::array::from_fn(|l| start.wrapping_add(5 * l as u32));
                let mut got = [0f32; 8];
                // SAFETY: AVX2 is present; eight lanes in and out.
                unsafe {
                    let u = uniform8(
                        _mm256_set1_epi32(key as i32),
                        _mm256_loadu_si256(idx.as_ptr() as *const __m256i),
                    );
                    _mm256_storeu_ps(got.as_mut_ptr(), u);
                }
                for l in 0..8 {
                    assert_eq!(got[l].to_bits(), uniform(key, idx[l]).to_bits());
                }
            }
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
