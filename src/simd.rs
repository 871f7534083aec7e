//! Which SIMD kernels this CPU can run, detected once at run time (the shipped build targets
//! baseline x86-64; no kernel is chosen at compile time).
//!
//! Three levels on x86-64: portable code, AVX2 (with FMA, F16C, POPCNT, BMI2 and LZCNT, which every
//! AVX2 CPU of note has) and AVX-512 (F, BW, DQ, VL; the SmaQ kernels also need VBMI and
//! VBMI2). Every kernel gives the same bytes at every level (each module tests that).
//!
//! `SMAQ_RS_AVX512=0` in the environment, read once, keeps every kernel at the AVX2 level: for
//! comparisons, or on CPUs where 512-bit instructions lower the clock.

#[cfg(target_arch = "x86_64")]
use std::sync::OnceLock;

/// AVX2, FMA, F16C, POPCNT, BMI2 and LZCNT.
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
                && is_x86_feature_detected!("bmi2")
                && is_x86_feature_detected!("lzcnt")
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

/// [`avx512`] plus CD (vector leading-zero counts).
#[inline]
pub fn avx512_cd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| avx512() && is_x86_feature_detected!("avx512cd"))
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

/// Defines `fn $name` and its body, compiled for AVX-512 (F, BW), for the AVX2 level (BMI2 and
/// LZCNT included) or for baseline x86-64, as this CPU allows: for plain loops that LLVM
/// vectorizes by itself once the features are enabled, and for bit-coding loops that want
/// BMI2's shifts and LZCNT.
/// The body is also the `#[inline(always)]` function `$portable` (the baseline build, which
/// tests compare the dispatched one with). The three are the same source, so they compute the
/// same thing.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)?
        = $portable:ident $body:block) => {
        #[doc = concat!("[`", stringify!($name), "`] as the baseline x86-64 build.")]
        #[inline(always)]
        fn $portable($($a: $t),*) $(-> $r)? $body

        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,bmi2,lzcnt")]
                unsafe fn v512($($a: $t),*) $(-> $r)? {
                    $portable($($a),*)
                }
                #[target_feature(enable = "avx2,bmi2,lzcnt")]
                unsafe fn v2($($a: $t),*) $(-> $r)? {
                    $portable($($a),*)
                }
                if $crate::simd::avx512() {
                    // SAFETY: AVX-512 F and BW and the AVX2 level are present (checked at run
                    // time).
                    return unsafe { v512($($a),*) };
                }
                if $crate::simd::avx2() {
                    // SAFETY: the AVX2 level is present (checked at run time).
                    return unsafe { v2($($a),*) };
                }
            }
            $portable($($a),*)
        }
    };
}
pub(crate) use multiversion;

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

/// float16 and bfloat16 widened to float32 (exactly), eight values per instruction where the CPU
/// has AVX2 (F16C for float16): the `half` crate's slice conversion runs one value at a time
/// in a baseline x86-64 build, which made SmaQ's half-precision encode (which widens every block
/// before coding it) about twice the float32 encode's time.
pub trait Widen: Sized {
    /// Writes `x` as float32 into `out` (the same length).
    fn widen(x: &[Self], out: &mut [f32]);
}

/// `Widen` for a half type: its AVX2 kernel (`x86::$kernel`, features checked by `avx2()`),
/// else the `half` crate's conversion.
macro_rules! widen_impl {
    ($t:ty, $kernel:ident) => {
        impl Widen for $t {
            fn widen(x: &[$t], out: &mut [f32]) {
                assert_eq!(x.len(), out.len(), "widen: lengths differ");
                #[cfg(target_arch = "x86_64")]
                if avx2() {
                    // SAFETY: AVX2 and F16C are present (checked just above); the lengths are
                    // equal.
                    unsafe { x86::$kernel(x, out) };
                    return;
                }
                use half::slice::HalfFloatSliceExt;
                x.convert_to_f32_slice(out);
            }
        }
    };
}
widen_impl!(half::bf16, widen_bf16);
widen_impl!(half::f16, widen_f16);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Eight 16-bit patterns at a time through `one`, the tail through `rest`.
    #[inline(always)]
    fn widen_with<T: Copy>(
        x: &[T],
        out: &mut [f32],
        one: impl Fn(__m128i) -> __m256,
        rest: impl Fn(T) -> f32,
    ) {
        let n = x.len() / 8 * 8;
        let (src, dst) = (x.as_ptr().cast::<u16>(), out.as_mut_ptr());
        let mut i = 0;
        while i < n {
            // SAFETY: i + 8 <= n <= both lengths (the callers' contract), and T is 16 bits.
            unsafe { _mm256_storeu_ps(dst.add(i), one(_mm_loadu_si128(src.add(i).cast()))) };
            i += 8;
        }
        for (o, &v) in out[n..].iter_mut().zip(&x[n..]) {
            *o = rest(v);
        }
    }

    /// # Safety
    /// The CPU has AVX2; `out.len() == x.len()`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn widen_bf16(x: &[half::bf16], out: &mut [f32]) {
        widen_with(
            x,
            out,
            |h| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))),
            half::bf16::to_f32,
        );
    }

    /// # Safety
    /// The CPU has AVX2 and F16C; `out.len() == x.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_f16(x: &[half::f16], out: &mut [f32]) {
        widen_with(x, out, |h| _mm256_cvtph_ps(h), half::f16::to_f32);
    }
}

#[cfg(test)]
mod widen_tests {
    use super::Widen;

    /// Every bit pattern of both types widens as `half` does (NaN to a NaN).
    #[test]
    fn every_half_value_widens_exactly() {
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        for n in [0, 1, 7, 8, 9, 65_536] {
            let b: Vec<half::bf16> = bits[..n]
                .iter()
                .map(|&v| half::bf16::from_bits(v))
                .collect();
            let mut out = vec![0f32; n];
            half::bf16::widen(&b, &mut out);
            for (v, o) in b.iter().zip(&out) {
                // NaN: a NaN (`half` sets the quiet bit, the shift keeps the payload as it is).
                if v.is_nan() {
                    assert!(o.is_nan());
                } else {
                    assert_eq!(v.to_f32().to_bits(), o.to_bits());
                }
            }
            let f: Vec<half::f16> = bits[..n].iter().map(|&v| half::f16::from_bits(v)).collect();
            half::f16::widen(&f, &mut out);
            for (v, o) in f.iter().zip(&out) {
                let want = v.to_f32();
                // NaN: a NaN (F16C quiets a signalling one; `half` may keep it).
                if want.is_nan() {
                    assert!(o.is_nan());
                } else {
                    assert_eq!(want.to_bits(), o.to_bits());
                }
            }
        }
    }
}
