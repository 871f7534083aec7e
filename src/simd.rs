//! Which SIMD kernels this CPU can run, detected once at run time (the shipped build targets
//! baseline x86-64; no kernel is chosen at compile time).
//!
//! Three levels on x86-64: portable code, AVX2 (with FMA, F16C and POPCNT, which every AVX2 CPU
//! of note has) and AVX-512 (F, BW, DQ, VL; the SmaQ kernels also need VBMI and VBMI2). Every
//! kernel gives the same bytes at every level (each module tests that).
//!
//! `SMAQ_RS_AVX512=0` in the environment, read once, keeps every kernel at the AVX2 level: for
//! comparisons, or on CPUs where 512-bit instructions lower the clock.

#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

/// AVX2, FMA, F16C and POPCNT.
#[inline]
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("popcnt")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 F, BW, DQ and VL (and the AVX2 level), unless `SMAQ_RS_AVX512=0`.
#[inline]
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            avx2()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
                && std::env::var_os("SMAQ_RS_AVX512").is_none_or(|v| v != "0")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`avx512`] plus VBMI and VBMI2 (byte permutes, compress and expand).
#[inline]
pub fn avx512_vbmi() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            avx512()
                && is_x86_feature_detected!("avx512vbmi")
                && is_x86_feature_detected!("avx512vbmi2")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Payloads at least this large are written with non-temporal stores: half this machine class's
/// last-level cache (32 MiB on the Zen 4 parts measured), above which the codes would only evict
/// the input still to be read.
pub const STREAM_MIN_BYTES: usize = 16 << 20;

/// Whether an encoder writing `bytes` of codes in one pass should use non-temporal stores, which
/// skip reading each output line into the cache before overwriting it (a quarter of an fp16
/// encode's memory traffic). `SMAQ_RS_STREAM=0` turns them off, `=1` forces them on at any size
/// (for tests and comparisons); read once.
pub fn stream_output(bytes: usize) -> bool {
    static MODE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let mode = *MODE.get_or_init(|| match std::env::var("SMAQ_RS_STREAM").as_deref() {
        Ok("0") => Some(false),
        Ok("1") => Some(true),
        _ => None,
    });
    mode.unwrap_or(bytes >= STREAM_MIN_BYTES)
}
