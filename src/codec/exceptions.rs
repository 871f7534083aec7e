//! Exception lists: values a lossy codec cannot represent (NaN and +-Inf) kept bit-exact after
//! its codes, each as its u64 element index (little-endian) and the raw element bytes, in
//! increasing index order (docs/FORMAT.md). Shared by the `int`, `luq` and `bdi` codecs.

use crate::dtype::Element;
use crate::error::{ensure_format, Error, Result};

/// NaN/Inf kept exactly: u64 index + the raw element, appended to `out`. Returns the count.
pub(crate) fn collect_exceptions<T: Element>(x: &[T], base: u64, out: &mut Vec<u8>) -> u64 {
    let mut n = 0;
    for (i, v) in x.iter().enumerate() {
        if !v.is_finite() {
            out.extend_from_slice(&(base + i as u64).to_le_bytes());
            out.extend_from_slice(&v.to_bits_u64().to_le_bytes()[..T::DTYPE.size()]);
            n += 1;
        }
    }
    n
}

/// Bytes of `count` exceptions of `dsize`-byte elements, or a format error on overflow.
pub(crate) fn exception_bytes(count: u64, dsize: usize, what: &str) -> Result<u64> {
    count
        .checked_mul(8 + dsize as u64)
        .ok_or_else(|| Error::Format(format!("{what}: exception count {count} overflows")))
}

/// Writes the exceptions in `list` into `out`, checking indices are in range and increasing.
pub(crate) fn apply_exceptions<T: Element>(list: &[u8], out: &mut [T], what: &str) -> Result<()> {
    let esize = 8 + T::DTYPE.size();
    let mut prev: Option<u64> = None;
    for e in list.chunks_exact(esize) {
        let i = u64::from_le_bytes(e[..8].try_into().unwrap());
        ensure_format!(
            i < out.len() as u64 && prev.is_none_or(|p| i > p),
            "{what}: exception index {i} is out of order or out of range"
        );
        let mut raw = [0u8; 8];
        raw[..esize - 8].copy_from_slice(&e[8..]);
        out[i as usize] = T::from_bits_u64(u64::from_le_bytes(raw));
        prev = Some(i);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_lists() {
        let x = [1.0f32, f32::NAN, 2.0, f32::NEG_INFINITY, f32::INFINITY];
        let mut list = Vec::new();
        assert_eq!(collect_exceptions(&x[1..], 1, &mut list), 3);
        assert_eq!(list.len() as u64, exception_bytes(3, 4, "t").unwrap());
        let mut out = [0f32; 5];
        apply_exceptions(&list, &mut out, "t").unwrap();
        assert!(out[1].is_nan() && out[3] == f32::NEG_INFINITY && out[4] == f32::INFINITY);
        assert_eq!((out[0], out[2]), (0.0, 0.0));
        // Out of range, then out of order.
        assert!(apply_exceptions(&list, &mut out[..4], "t").is_err());
        let mut swapped = list[12..24].to_vec();
        swapped.extend_from_slice(&list[..12]);
        assert!(apply_exceptions(&swapped, &mut out, "t").is_err());
        assert!(exception_bytes(u64::MAX, 4, "t").is_err());
    }
}
