//! Little-endian byte writing and bounds-checked reading, shared by codec metadata and the format.

use crate::error::{Error, Result};

/// Appends little-endian values to a byte vector.
#[derive(Debug, Default)]
pub struct LeWriter(pub Vec<u8>);

impl LeWriter {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.u32(v.to_bits())
    }
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.u64(v.to_bits())
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// An unsigned LEB128 varint: seven bits per byte, low bits first, the top bit set on
    /// every byte but the last (1 byte below 128, 3 below 2^21, at most 10).
    pub fn varint(&mut self, mut v: u64) -> &mut Self {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
        self
    }
}

/// Reads little-endian values; every read checks the remaining length and names what it read.
#[derive(Debug)]
pub struct LeReader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> LeReader<'a> {
    /// `what` names the structure being read, for error messages.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    pub fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                Error::Format(format!(
                    "{}: truncated reading {field}: need {n} bytes at offset {}, have {}",
                    self.what,
                    self.pos,
                    self.buf.len().saturating_sub(self.pos)
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        Ok(self.take(N, field)?.try_into().unwrap())
    }
    pub fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.arr::<1>(field)?[0])
    }
    pub fn u16(&mut self, field: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.arr(field)?))
    }
    pub fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(field)?))
    }
    pub fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(field)?))
    }
    pub fn f32(&mut self, field: &str) -> Result<f32> {
        Ok(f32::from_bits(self.u32(field)?))
    }
    pub fn f64(&mut self, field: &str) -> Result<f64> {
        Ok(f64::from_bits(self.u64(field)?))
    }
    /// An unsigned LEB128 varint as [`LeWriter::varint`] writes it; an overlong encoding (a
    /// zero final byte after the first, or bits past 64) is an error, so every value has one
    /// encoding.
    pub fn varint(&mut self, field: &str) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8(field)?;
            let bits = (b & 0x7f) as u64;
            if (i == 9 && b > 1) || (i > 0 && b == 0) {
                return Err(Error::Format(format!(
                    "{}: {field} is not a canonical varint (offset {})",
                    self.what,
                    self.pos - 1
                )));
            }
            v |= bits << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        unreachable!("the tenth byte is at most 1")
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(Error::Format(format!(
                "{}: {} unexpected trailing bytes after offset {}",
                self.what,
                self.remaining(),
                self.pos
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_reject_overlong_encodings() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            16383,
            16384,
            1 << 21,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut w = LeWriter::default();
            w.varint(v);
            let want = (64 - v.leading_zeros()).div_ceil(7).max(1) as usize;
            assert_eq!(w.0.len(), want, "{v}");
            let mut r = LeReader::new(&w.0, "test");
            assert_eq!(r.varint("v").unwrap(), v);
            r.finish().unwrap();
            // Every shorter prefix is truncated.
            for cut in 0..w.0.len() {
                assert!(LeReader::new(&w.0[..cut], "test").varint("v").is_err());
            }
        }
        for bad in [&[0x80, 0x00][..], &[0xff; 10][..], &[0x81, 0x80, 0x00][..]] {
            let e = LeReader::new(bad, "test").varint("v").unwrap_err();
            assert!(matches!(e, Error::Format(_)), "{bad:?}");
        }
    }
}
