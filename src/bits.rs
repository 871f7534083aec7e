//! LSB-first bit packing: the first code occupies the lowest bits of the first byte.

/// Appends codes of 1..=32 bits to a byte vector.
#[derive(Debug, Default)]
pub struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    nbits: u32,
}

impl BitWriter {
    pub fn with_capacity_bits(bits: usize) -> Self {
        Self {
            out: Vec::with_capacity(bits.div_ceil(8) + 8),
            acc: 0,
            nbits: 0,
        }
    }

    /// Appends the low `width` bits of `code` (the bits above must be zero), `width` <= 32.
    #[inline(always)]
    pub fn put(&mut self, code: u32, width: u32) {
        debug_assert!(width <= 32 && (width == 32 || code >> width == 0));
        self.acc |= (code as u64) << self.nbits;
        self.nbits += width;
        if self.nbits >= 32 {
            self.out.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.nbits -= 32;
        }
    }

    /// Appends the low `width` bits of `code` (the bits above must be zero), `width` <= 64.
    #[inline(always)]
    pub fn put_wide(&mut self, code: u64, width: u32) {
        if width > 32 {
            self.put(code as u32, 32);
            self.put((code >> 32) as u32, width - 32);
        } else {
            self.put(code as u32, width);
        }
    }

    /// Number of bits written so far.
    pub fn bit_len(&self) -> usize {
        self.out.len() * 8 + self.nbits as usize
    }

    /// The packed bytes: exactly ceil(bit_len / 8) of them, unused high bits zero.
    pub fn finish(mut self) -> Vec<u8> {
        let tail = self.nbits.div_ceil(8) as usize;
        self.out.extend_from_slice(&self.acc.to_le_bytes()[..tail]);
        self.out
    }
}

/// Reads the 64 bits starting at bit `pos` of `buf` (bits past the end read as zero).
#[inline(always)]
pub fn peek64(buf: &[u8], pos: usize) -> u64 {
    let byte = pos >> 3;
    let word = match buf.get(byte..byte + 8) {
        Some(b) => u64::from_le_bytes(b.try_into().unwrap()),
        None => {
            let mut w = [0u8; 8];
            if byte < buf.len() {
                let rest = &buf[byte..];
                w[..rest.len()].copy_from_slice(rest);
            }
            u64::from_le_bytes(w)
        }
    };
    word >> (pos & 7)
}

/// Reads the `width`-bit code (<= 32) at bit `pos`.
#[inline(always)]
pub fn get(buf: &[u8], pos: usize, width: u32) -> u32 {
    (peek64(buf, pos) & ((1u64 << width) - 1)) as u32
}

/// Packs `codes`, each `width` bits wide, into ceil(len*width/8) bytes.
pub fn pack(codes: &[u32], width: u32) -> Vec<u8> {
    let mut w = BitWriter::with_capacity_bits(codes.len() * width as usize);
    for &c in codes {
        w.put(c, width);
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn mixed_width_round_trip(items in prop::collection::vec((any::<u32>(), 1u32..=32), 0..300)) {
            let items: Vec<(u32, u32)> = items
                .into_iter()
                .map(|(c, w)| (if w == 32 { c } else { c & ((1 << w) - 1) }, w))
                .collect();
            let mut wr = BitWriter::default();
            for &(c, w) in &items { wr.put(c, w); }
            let bits: usize = items.iter().map(|&(_, w)| w as usize).sum();
            prop_assert_eq!(wr.bit_len(), bits);
            let buf = wr.finish();
            prop_assert_eq!(buf.len(), bits.div_ceil(8));
            let mut pos = 0;
            for &(c, w) in &items {
                prop_assert_eq!(get(&buf, pos, w), c);
                pos += w as usize;
            }
        }

        #[test]
        fn fixed_width_pack(codes in prop::collection::vec(0u32..64, 0..500)) {
            let buf = pack(&codes, 6);
            prop_assert_eq!(buf.len(), (codes.len() * 6).div_ceil(8));
            for (i, &c) in codes.iter().enumerate() {
                prop_assert_eq!(get(&buf, i * 6, 6), c);
            }
        }
    }

    #[test]
    fn wide_puts() {
        let mut w = BitWriter::default();
        w.put(5, 3);
        w.put_wide(0x1_2345_6789_abcd, 49);
        w.put_wide(0, 0);
        w.put_wide(u64::MAX, 64);
        let buf = w.finish();
        assert_eq!(get(&buf, 0, 3), 5);
        assert_eq!(peek64(&buf, 3) & ((1 << 49) - 1), 0x1_2345_6789_abcd);
        assert_eq!(peek64(&buf, 52) & 0xff_ffff, 0xff_ffff);
        assert_eq!(buf.len(), (3 + 49 + 64usize).div_ceil(8));
    }

    #[test]
    fn reads_past_the_end_are_zero() {
        let buf = [0xffu8; 3];
        assert_eq!(get(&buf, 20, 8), 0x0f);
        assert_eq!(get(&buf, 100, 8), 0);
    }
}
