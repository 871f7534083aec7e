//! S2FP8's per-tensor shift and squeeze (Cambier et al. 2020; docs/CODECS.md, "Floating
//! point"): an affine map of log2|x| fitted to the tensor so that its values fill e5m2's range,
//! applied before encoding and undone after decoding. Its two parameters, alpha and beta, are
//! stored in the codec's metadata.

use rayon::prelude::*;

use super::CHUNK;

/// The transform y = sign(x) * 2^(alpha * log2|x| + beta): `beta` shifts and `alpha` squeezes
/// the logarithms of the magnitudes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct LogShiftSqueeze {
    pub(super) alpha: f32,
    pub(super) beta: f32,
}

impl LogShiftSqueeze {
    /// From the non-zero finite values: mu = mean(log2|x|), m = max(log2|x|); alpha maps m - mu
    /// to 15 and beta moves mu to 0.
    pub(super) fn fit(x: &[f32]) -> Self {
        let (sum, cnt, max) = crate::pool::install(|| {
            x.par_chunks(CHUNK)
                .map(|c| {
                    let (mut s, mut n, mut m) = (0f64, 0u64, f64::NEG_INFINITY);
                    for &v in c {
                        let a = v.abs();
                        if a > 0.0 && a.is_finite() {
                            let l = a.log2() as f64;
                            s += l;
                            n += 1;
                            m = m.max(l);
                        }
                    }
                    (s, n, m)
                })
                .reduce(
                    || (0.0, 0, f64::NEG_INFINITY),
                    |a, b| (a.0 + b.0, a.1 + b.1, a.2.max(b.2)),
                )
        });
        if cnt == 0 {
            return LogShiftSqueeze {
                alpha: 1.0,
                beta: 0.0,
            };
        }
        let mu = sum / cnt as f64;
        let alpha = if max - mu > 1e-6 {
            15.0 / (max - mu)
        } else {
            1.0
        };
        LogShiftSqueeze {
            alpha: alpha as f32,
            beta: (-alpha * mu) as f32,
        }
    }

    /// The squeezed values of `x` (NaN stays NaN), ready for the e5m2 codes.
    pub(super) fn squeeze(&self, x: &[f32]) -> Vec<f32> {
        x.iter()
            .map(|&v| {
                let y = (self.alpha * v.abs().log2() + self.beta).exp2();
                if v.is_nan() {
                    v
                } else {
                    y.copysign(v)
                }
            })
            .collect()
    }

    /// Undoes [`Self::squeeze`] on decoded values, in place (non-finite values stay as they are).
    pub(super) fn unsqueeze(&self, v: &mut [f32]) {
        let (inv, beta) = (1.0 / self.alpha, self.beta);
        for v in v.iter_mut() {
            if v.is_finite() {
                *v = ((v.abs().log2() - beta) * inv).exp2().copysign(*v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::round_trip;
    use super::super::Kind;
    use crate::codec::Params;

    #[test]
    fn s2fp8_relative_error() {
        // Log-uniform magnitudes over 2^-12..2^-4: squeezed into e5m2's range, the relative error
        // is about 2^-3 / alpha.
        let mut r = crate::rng::SplitMix64::new(8);
        let x: Vec<f32> = (0..50_000)
            .map(|i| {
                let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                let v = (u * 8.0 - 12.0).exp2();
                if i % 2 == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect();
        let (y, _) = round_trip(Kind::S2fp8, &Params::new(), &x);
        for (a, b) in x.iter().zip(&y) {
            // Near the bottom of the range the squeezed value is an e5m2 subnormal: less precise.
            let tol = if a.abs() > 2f32.powf(-10.5) {
                0.04
            } else {
                0.25
            };
            assert!(((a - b) / a).abs() < tol, "{a} -> {b}");
        }
    }
}
