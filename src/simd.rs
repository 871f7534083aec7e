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
