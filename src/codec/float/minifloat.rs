//! The small float formats the float codecs write ([`MiniFloat`]: sign, exponent and mantissa
//! bits, bias, whether infinities exist), the value of each code, and the rounding of one float32
//! to one code ([`RoundingPlan`], [`to_code`]) that every encode kernel reproduces bit for bit
//! (docs/CODECS.md, "Floating point").

// The rounding modes, numbered as the metadata stores them (their index in `ROUNDINGS`).

/// Nearest, ties to even (the IEEE cast).
pub(super) const NEAREST: u8 = 0;
/// Add uniform random bits below the kept mantissa, then truncate (unbiased).
pub(super) const STOCHASTIC: u8 = 1;
/// Toward zero.
pub(super) const TRUNCATE: u8 = 2;

/// A small float format: sign, `ebits` exponent bits, `mbits` mantissa bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MiniFloat {
    pub ebits: u32,
    pub mbits: u32,
    pub bias: i32,
    /// IEEE-style: the all-ones exponent holds Inf and NaN. Otherwise (e4m3fn) only the all-ones
    /// code is NaN and there is no infinity.
    pub has_inf: bool,
}

impl MiniFloat {
    /// float8 e4m3fn: bias 7, no infinities, only the all-ones code is NaN (max 448).
    pub const E4M3FN: MiniFloat = MiniFloat {
        ebits: 4,
        mbits: 3,
        bias: 7,
        has_inf: false,
    };

    /// An IEEE-style format: bias 2^(ebits - 1) - 1, infinities and NaNs in the top exponent.
    pub const fn ieee(ebits: u32, mbits: u32) -> Self {
        MiniFloat {
            ebits,
            mbits,
            bias: (1 << (ebits - 1)) - 1,
            has_inf: true,
        }
    }
    pub fn width(self) -> u32 {
        1 + self.ebits + self.mbits
    }
    /// Largest finite magnitude code.
    pub(super) fn max_code(self) -> u32 {
        if self.has_inf {
            (((1 << self.ebits) - 1) << self.mbits) - 1
        } else {
            (1 << (self.ebits + self.mbits)) - 2
        }
    }
    fn inf_code(self) -> u32 {
        ((1 << self.ebits) - 1) << self.mbits
    }
    fn nan_code(self) -> u32 {
        if self.has_inf {
            self.inf_code() | (1 << (self.mbits - 1))
        } else {
            (1 << (self.ebits + self.mbits)) - 1
        }
    }
    /// The value of a code (sign included), exactly.
    pub fn value(self, code: u32) -> f32 {
        let neg = code >> (self.ebits + self.mbits) & 1 == 1;
        let mag = code & ((1 << (self.ebits + self.mbits)) - 1);
        let e = (mag >> self.mbits) as i32;
        let m = mag & ((1 << self.mbits) - 1);
        let v = if self.has_inf && e == (1 << self.ebits) - 1 {
            if m == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        } else if !self.has_inf && mag == self.nan_code() {
            f32::NAN
        } else if e == 0 {
            m as f32 * (2f64.powi(1 - self.bias - self.mbits as i32)) as f32
        } else {
            ((1.0 + m as f64 / (1u64 << self.mbits) as f64) * 2f64.powi(e - self.bias)) as f32
        };
        if neg {
            -v
        } else {
            v
        }
    }
}

/// Everything the rounding of float32 to one format's codes needs, precomputed once per
/// encoding: the format's shifts and thresholds and the codes that overflow and specials get.
#[derive(Debug, Clone, Copy)]
pub(super) struct RoundingPlan {
    /// Mantissa bits dropped from float32.
    pub(super) shift: u32,
    /// (127 - bias) << 23: re-biases the exponent in the integer domain.
    pub(super) rebias: u32,
    /// float32 bit pattern of the target's smallest normal (below it: subnormal path).
    pub(super) min_normal: u32,
    /// 2^(bias - 1 + mbits): scales a subnormal to its integer mantissa.
    sub_scale: f32,
    /// float32 bits of 2^(24 - bias - mbits), whose ulp is the target's subnormal spacing
    /// 2^(1 - bias - mbits) (the AVX-512 kernel's subnormal rounding).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) sub_magic: u32,
    pub(super) max_code: u32,
    pub(super) nan_code: u32,
    /// Code of a finite overflow, and of +-Inf input.
    pub(super) overflow_code: u32,
    pub(super) inf_input_code: u32,
    pub(super) sign_shift: u32,
    /// No subnormal path needed (8 exponent bits: float32's own subnormals shift directly).
    pub(super) e8: bool,
}

impl RoundingPlan {
    /// The plan for format `f`; `saturate`: finite overflows become +-max instead of Inf (NaN
    /// for formats without infinities).
    pub(super) fn new(f: MiniFloat, saturate: bool) -> Self {
        let e8 = f.ebits == 8;
        let overflow_code = if saturate {
            f.max_code()
        } else if f.has_inf {
            f.inf_code()
        } else {
            f.nan_code()
        };
        let inf_input_code = if f.has_inf {
            f.inf_code()
        } else {
            overflow_code
        };
        RoundingPlan {
            shift: 23 - f.mbits,
            rebias: if e8 { 0 } else { ((127 - f.bias) as u32) << 23 },
            min_normal: if e8 {
                0
            } else {
                ((1 - f.bias + 127) as u32) << 23
            },
            sub_scale: 2f32.powi(f.bias - 1 + f.mbits as i32),
            sub_magic: ((127 + 24 - f.bias - f.mbits as i32) as u32) << 23,
            max_code: f.max_code(),
            nan_code: f.nan_code(),
            overflow_code,
            inf_input_code,
            sign_shift: f.ebits + f.mbits,
            e8,
        }
    }
}

/// One float32 to one code with rounding `R` ([`NEAREST`], [`STOCHASTIC`] or [`TRUNCATE`]).
/// `h` is 32 random bits (stochastic rounding only).
#[inline(always)]
pub(super) fn to_code<const R: u8>(x: f32, h: u32, p: &RoundingPlan) -> u32 {
    let bits = x.to_bits();
    let sign = (bits >> 31) << p.sign_shift;
    let a = bits & 0x7fff_ffff;
    let s = p.shift;
    let r = match R {
        NEAREST => ((1u32 << s) >> 1)
            .wrapping_sub(1)
            .wrapping_add((a >> s) & 1),
        STOCHASTIC => (h >> 1) >> (31 - s),
        _ => 0,
    };
    let normal = a.wrapping_add(r).wrapping_sub(p.rebias) >> s;
    let code = if p.e8 || a >= p.min_normal {
        normal
    } else {
        // Subnormal in the target: its integer mantissa is |x| * 2^(bias-1+m); 2^m is the
        // smallest normal code, so rounding up into it is correct.
        let q = f32::from_bits(a) * p.sub_scale;
        let qi = match R {
            NEAREST => (q + 12_582_912.0) - 12_582_912.0,
            STOCHASTIC => q + (h >> 8) as f32 * (1.0 / 16_777_216.0),
            _ => q,
        };
        small_to_u32(qi)
    };
    let code = if code > p.max_code {
        p.overflow_code
    } else {
        code
    };
    let code = if a >= 0x7f80_0000 {
        if a == 0x7f80_0000 {
            p.inf_input_code
        } else {
            p.nan_code
        }
    } else {
        code
    };
    sign | code
}

/// `q` (a subnormal's integer mantissa, at most 2^mbits, for the lanes that use it) as an integer.
/// Clamped so the conversion is defined for every lane: unlike `q as i32` (saturating, which
/// LLVM cannot vectorize), this compiles to one `vcvttps2dq` per 8 lanes. Max before min maps NaN
/// (from lanes that take the other branch) to 0.
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp() keeps NaN, which must become 0 here
fn small_to_u32(q: f32) -> u32 {
    let q = q.max(0.0).min(131_072.0);
    // SAFETY: q is finite and in [0, 2^17], so it fits an i32.
    unsafe { q.to_int_unchecked::<i32>() as u32 }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{boundaries, round_trip};
    use super::super::{Kind, FP8_FORMATS, OVERFLOWS};
    use super::*;
    use crate::codec::{Param, Params};

    #[test]
    fn fp8_boundaries_are_nearest_even() {
        // Every midpoint between neighbouring codes (ties), one ulp either side, the overflow
        // threshold and the subnormals, through the encoder's dispatch, against brute force.
        let e4m3 = MiniFloat::E4M3FN;
        for (e5m2, fmt) in [(false, e4m3), (true, MiniFloat::ieee(5, 2))] {
            let mut x = boundaries(fmt);
            x.extend([0.0, -0.0, f32::MIN_POSITIVE, -1e-45, 1e30, -1e30]);
            assert_fp8_nearest(e5m2, fmt, &x);
        }
    }

    #[test]
    fn fp8_nearest_is_exact_nearest_even() {
        let mut x: Vec<f32> = (0..20_000)
            .map(|i| (i as f32 - 10_000.0) * 0.0371)
            .collect();
        x.extend((0..2000).map(|i| (i as f32) * 1e-5));
        x.extend([1e6, -1e6, 500.0, 60000.0, 70000.0]);
        for (e5m2, fmt) in [(false, MiniFloat::E4M3FN), (true, MiniFloat::ieee(5, 2))] {
            assert_fp8_nearest(e5m2, fmt, &x);
        }
    }

    /// Nearest-even against a brute-force search over every code of the format.
    /// Every value of `x` through fp8 (`e5m2` or e4m3, `fmt`) with both overflow modes gives
    /// the brute-force nearest code.
    fn assert_fp8_nearest(e5m2: bool, fmt: MiniFloat, x: &[f32]) {
        for sat in [true, false] {
            let mut p = Params::new();
            p.insert(
                "format".into(),
                Param::Str(FP8_FORMATS[e5m2 as usize].into()),
            );
            p.insert(
                "overflow".into(),
                Param::Str(OVERFLOWS[sat as usize].into()),
            );
            let (y, _) = round_trip(Kind::Fp8 { e5m2 }, &p, x);
            for (a, b) in x.iter().zip(&y) {
                let want = brute_nearest(fmt, *a, sat);
                assert!(
                    want.to_bits() == b.to_bits() || (want.is_nan() && b.is_nan()),
                    "e5m2={e5m2} sat={sat}: {a:e} -> {b:e}, want {want:e}"
                );
            }
        }
    }

    fn brute_nearest(f: MiniFloat, x: f32, saturate: bool) -> f32 {
        if x.is_nan() {
            return f32::NAN;
        }
        let n = 1u32 << (f.ebits + f.mbits);
        let mut best = (f64::INFINITY, 0u32);
        for c in 0..=f.max_code() {
            let d = (f.value(c) as f64 - x.abs() as f64).abs();
            if d < best.0 || (d == best.0 && c % 2 == 0) {
                best = (d, c);
            }
        }
        let max = f.value(f.max_code()) as f64;
        let ulp = max - f.value(f.max_code() - 1) as f64;
        let mut v = f.value(best.1);
        // Overflow: beyond the midpoint above max, or on it when ties-to-even rounds away from
        // max (an odd max code: IEEE formats; e4m3fn's max, 448, is even and keeps the tie).
        let thr = max + ulp / 2.0;
        let a = x.abs() as f64;
        if a > thr || (a == thr && f.max_code() % 2 == 1) {
            v = if saturate {
                max as f32
            } else if f.has_inf {
                f32::INFINITY
            } else {
                f.value(n - 1)
            };
        }
        v.copysign(x)
    }

    #[test]
    fn stochastic_is_unbiased() {
        let x = vec![1.0f32 + 1.0 / 3.0 * 0.125; 1 << 18];
        let mut p = Params::new();
        p.insert("rounding".into(), Param::Str("stochastic".into()));
        p.insert("format".into(), Param::Str("e4m3".into()));
        p.insert("seed".into(), Param::Int(3));
        let (y, _) = round_trip(Kind::Fp8 { e5m2: false }, &p, &x);
        let mean = y.iter().map(|&v| v as f64).sum::<f64>() / y.len() as f64;
        assert!((mean - x[0] as f64).abs() < 2e-4, "mean {mean}");
        assert!(y.iter().all(|&v| v == 1.0 || v == 1.125));
    }
}
