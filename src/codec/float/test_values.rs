//! Test inputs shared by the float codecs' tests: a round trip through the codec, random
//! float32 values of every magnitude and bit pattern class, and the values at every rounding
//! boundary of a format.

use super::decode::FloatDecoder;
use super::minifloat::MiniFloat;
use super::{FloatConfig, Kind};
use crate::codec::{Decoder, Encoder, Params};
use crate::dtype::{Data, DataMut};

/// `x` encoded by codec `kind` with parameters `p` and decoded as float32; and the payload's
/// length in bytes.
pub fn round_trip(kind: Kind, p: &Params, x: &[f32]) -> (Vec<f32>, usize) {
    let cfg = FloatConfig::from_params(kind, p).unwrap();
    let enc = cfg.encode(Data::F32(x)).unwrap();
    let frame = crate::codec::testing::frame_f32(&enc, x.len());
    let h = FloatDecoder::parse(kind, &enc.meta, frame).unwrap();
    let mut out = vec![0f32; x.len()];
    h.decode(&enc.payload, DataMut::F32(&mut out)).unwrap();
    (out, enc.payload.len())
}

/// Random finite float32 values of every magnitude, plus a few fp16 and fp8 landmarks.
pub fn samples() -> Vec<f32> {
    let mut r = crate::rng::SplitMix64::new(5);
    let mut v: Vec<f32> = (0..200_000)
        .map(|_| {
            let bits = r.next_u64() as u32;
            f32::from_bits(bits)
        })
        .filter(|v| v.is_finite())
        .collect();
    v.extend([
        0.0, -0.0, 1.0, 65504.0, 65520.0, 1e-8, 5.96e-8, 448.0, 464.0, 1e30,
    ]);
    v
}

/// Every bit pattern class: random bits (NaN payloads, subnormals, huge values) and specials.
pub fn all_bits(n: usize) -> Vec<f32> {
    let mut r = crate::rng::SplitMix64::new(11);
    let mut v: Vec<f32> = (0..n)
        .map(|_| f32::from_bits(r.next_u64() as u32))
        .collect();
    v.extend(samples().into_iter().take(20_000));
    v.extend([
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffc1_2345),
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        1e-45,
        65519.99,
        65520.0,
        -65520.0,
    ]);
    v
}

/// Values at and beside every rounding boundary of `f` (midpoints between neighbouring codes,
/// one float32 ulp either side), the overflow threshold, and the subnormal range, both signs.
pub fn boundaries(f: MiniFloat) -> Vec<f32> {
    let mut v = Vec::new();
    let top = f.max_code();
    // Every code of the 8- and 16-bit formats; for wider ones the lowest and highest codes
    // and a stride through the rest.
    let stride = (top / 100_000).max(1) as usize;
    let codes = (0..=top.min(4096))
        .chain((4096..top.saturating_sub(4096)).step_by(stride))
        .chain(top.saturating_sub(4096).max(4097)..=top);
    for c in codes {
        let lo = f.value(c) as f64;
        let hi = if c < top {
            f.value(c + 1) as f64
        } else {
            // One ulp above the largest finite value: its midpoint is the overflow threshold.
            lo + (lo - f.value(c - 1) as f64)
        };
        let mid = ((lo + hi) / 2.0) as f32;
        for m in [
            mid,
            f32::from_bits(mid.to_bits() - 1),
            f32::from_bits(mid.to_bits() + 1),
        ] {
            v.push(m);
            v.push(-m);
        }
        v.push(lo as f32);
        v.push(-(lo as f32));
    }
    v
}
