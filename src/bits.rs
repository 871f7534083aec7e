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

    /// A writer that appends to `out` after clearing it (its capacity is reused).
    pub fn from_vec(mut out: Vec<u8>) -> Self {
        out.clear();
        Self {
            out,
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

    /// Hands the end of the stream to a kernel that writes whole bytes (SIMD stores): `f(buf,
    /// bits)` gets at least `room` bytes whose first byte holds the `bits` (< 8) pending bits
    /// (its other bits zero, every later byte zero) and returns the stream's new length in bits
    /// counted from the start of `buf`; the bits it wrote past that length must be zero in the
    /// byte that holds the end (later bytes are dropped).
    pub fn append_raw(&mut self, room: usize, f: impl FnOnce(&mut [u8], usize) -> usize) {
        while self.nbits >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.nbits -= 8;
        }
        let base = self.out.len();
        let room = room.max(1);
        self.out.resize(base + room, 0);
        self.out[base] = self.acc as u8;
        let end = f(&mut self.out[base..], self.nbits as usize);
        assert!(end >= self.nbits as usize && end <= room * 8);
        let full = end / 8;
        self.nbits = (end % 8) as u32;
        self.acc = if self.nbits > 0 {
            (self.out[base + full] & ((1u8 << self.nbits) - 1)) as u64
        } else {
            0
        };
        self.out.truncate(base + full);
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

/// Appends `v` (< 2^32) as an exponential-Golomb code of order `k` (<= 31), LSB first: with
/// `w = v + 2^k` of bit length `n`, `n - k - 1` zero bits, a one, then the low `n - 1` bits of `w`.
/// Small values cost `k + 1` bits; each doubling beyond `2^k` costs two more.
#[inline]
pub fn put_exp_golomb(w: &mut BitWriter, v: u32, k: u32) {
    for (bits, len) in exp_golomb_runs(v, k, 64) {
        if len > 0 {
            w.put_wide(bits, len);
        }
    }
}

/// The [`put_exp_golomb`] code of `v` at order `k` as runs of bits to append in order, LSB
/// first, each at most `max` (>= 33) bits long: `(bits, length)`, the second of length 0 when
/// the whole code fits one run (the prefix and its terminating one, then the low bits above
/// them), else the prefix with its one, then the low bits.
#[inline(always)]
pub fn exp_golomb_runs(v: u32, k: u32, max: u32) -> [(u64, u32); 2] {
    debug_assert!(k <= 31 && max >= 33);
    let (code, len) = exp_golomb_code(v, k);
    if len <= max {
        return [(code, len), (0, 0)];
    }
    let (n, low) = exp_golomb_parts(v, k);
    [(1u64 << (n - k - 1), n - k), (low, n - 1)]
}

/// The [`put_exp_golomb`] code of `v` at order `k` as one run of bits and its length (up to 65
/// bits; the value is meaningful only when the length is at most 64).
#[inline(always)]
pub fn exp_golomb_code(v: u32, k: u32) -> (u64, u32) {
    let (n, low) = exp_golomb_parts(v, k);
    // The prefix's terminating one at bit n - k - 1, the low bits above it.
    ((low << 1 | 1).wrapping_shl(n - k - 1), 2 * n - k - 1)
}

/// The parts of an order-`k` code of `v`: the bit length `n` of `v + 2^k` and its low `n - 1`
/// bits (the code is n - k - 1 zeros, a one, then those bits).
#[inline(always)]
fn exp_golomb_parts(v: u32, k: u32) -> (u32, u64) {
    debug_assert!(k <= 31);
    let x = v as u64 + (1u64 << k);
    let n = 64 - x.leading_zeros();
    (n, x & ((1u64 << (n - 1)) - 1))
}

/// Bits [`put_exp_golomb`] takes for `v` at order `k`.
pub fn exp_golomb_len(v: u32, k: u32) -> u32 {
    let x = v as u64 + (1u64 << k);
    2 * (64 - x.leading_zeros()) - k - 1
}

/// Reads one [`put_exp_golomb`] code of order `k` at bit `*pos` of `buf`, advancing `*pos`. None
/// when the code runs past the end of `buf` or does not fit 32 bits (corrupt input).
pub fn get_exp_golomb(buf: &[u8], pos: &mut usize, k: u32) -> Option<u32> {
    let zeros = peek64(buf, *pos).trailing_zeros();
    // A valid code of a value below 2^32 has at most 32 - k leading zeros.
    if zeros + k > 32 {
        return None;
    }
    let n = zeros + k + 1;
    let low = peek64(buf, *pos + zeros as usize + 1) & ((1u64 << (n - 1)) - 1);
    let end = *pos + (2 * n - k - 1) as usize;
    if end > buf.len() * 8 {
        return None;
    }
    *pos = end;
    u32::try_from((1u64 << (n - 1) | low) - (1u64 << k)).ok()
}

/// Packs `codes`, each `width` bits wide, into ceil(len*width/8) bytes.
pub fn pack(codes: &[u32], width: u32) -> Vec<u8> {
    let mut w = BitWriter::with_capacity_bits(codes.len() * width as usize);
    for &c in codes {
        w.put(c, width);
    }
    w.finish()
}

/// Packs `codes` of `width` bits into `out` (exactly ceil(len * width / 8) bytes).
pub fn pack_into(codes: &[u16], width: u32, out: &mut [u8]) {
    match width {
        16 => {
            for (d, c) in out.chunks_exact_mut(2).zip(codes) {
                d.copy_from_slice(&c.to_le_bytes());
            }
        }
        4 => {
            for (d, c) in out.iter_mut().zip(codes.chunks(2)) {
                *d = (c[0] as u8) | ((*c.get(1).unwrap_or(&0) as u8) << 4);
            }
        }
        2 => {
            for (d, c) in out.iter_mut().zip(codes.chunks(4)) {
                let mut b = 0u8;
                for (k, &v) in c.iter().enumerate() {
                    b |= (v as u8) << (2 * k);
                }
                *d = b;
            }
        }
        _ => {
            let mut w = BitWriter::with_capacity_bits(codes.len() * width as usize);
            for &c in codes {
                w.put(c as u32, width);
            }
            out.copy_from_slice(&w.finish());
        }
    }
}

/// Unpacks `out.len()` codes of `width` bits.
pub fn unpack(src: &[u8], width: u32, out: &mut [u32]) {
    match width {
        8 => {
            for (o, &b) in out.iter_mut().zip(src) {
                *o = b as u32;
            }
        }
        16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = u16::from_le_bytes([b[0], b[1]]) as u32;
            }
        }
        4 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = ((src[i / 2] >> (4 * (i % 2))) & 15) as u32;
            }
        }
        _ => {
            let mask = (1u64 << width) - 1;
            for (i, o) in out.iter_mut().enumerate() {
                *o = (peek64(src, i * width as usize) & mask) as u32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exp_golomb_round_trips_and_has_its_length() {
        let values = [
            0u32,
            1,
            2,
            3,
            7,
            8,
            100,
            65_535,
            1 << 20,
            u32::MAX - (1 << 31),
            u32::MAX >> 1,
        ];
        for k in [0u32, 1, 3, 7, 15, 31] {
            let mut w = BitWriter::default();
            let mut bits = 0;
            for &v in &values {
                if v as u64 + (1u64 << k) >= 1u64 << 32 {
                    continue;
                }
                put_exp_golomb(&mut w, v, k);
                bits += exp_golomb_len(v, k) as usize;
            }
            assert_eq!(w.bit_len(), bits);
            let buf = w.finish();
            let mut pos = 0;
            for &v in &values {
                if v as u64 + (1u64 << k) >= 1u64 << 32 {
                    continue;
                }
                assert_eq!(get_exp_golomb(&buf, &mut pos, k), Some(v), "k={k}");
            }
            assert_eq!(pos, bits);
        }
        // The one-run form equals the runs wherever it fits 64 bits.
        for k in 0..32 {
            for v in values
                .into_iter()
                .chain((0..40).map(|s| (1u32 << (s % 32)) - 1))
            {
                let (code, len) = exp_golomb_code(v, k);
                assert_eq!(len, exp_golomb_len(v, k));
                if len <= 64 {
                    assert_eq!(
                        exp_golomb_runs(v, k, 64),
                        [(code, len), (0, 0)],
                        "v={v} k={k}"
                    );
                }
            }
        }
        // Order 0: 0 -> "1", 1 -> "010" (LSB first: 0, 1, 0), 2 -> "011".
        assert_eq!(exp_golomb_len(0, 0), 1);
        assert_eq!(exp_golomb_len(1, 0), 3);
        assert_eq!(exp_golomb_len(6, 0), 5);
    }

    #[test]
    fn exp_golomb_rejects_truncated_and_overlong_codes() {
        let mut w = BitWriter::default();
        put_exp_golomb(&mut w, 1000, 2);
        let buf = w.finish();
        let mut pos = 0;
        assert_eq!(get_exp_golomb(&buf[..1], &mut pos, 2), None);
        assert_eq!(pos, 0);
        // All zeros: no terminating one within 32 - k bits.
        assert_eq!(get_exp_golomb(&[0u8; 8], &mut pos, 0), None);
    }

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
        fn pack_into_and_unpack_round_trip(
            codes in prop::collection::vec(any::<u16>(), 0..300),
            width in 2u32..=16,
        ) {
            let codes: Vec<u16> = codes.iter().map(|&c| (c as u32 & ((1 << width) - 1)) as u16).collect();
            let mut buf = vec![0u8; (codes.len() * width as usize).div_ceil(8)];
            pack_into(&codes, width, &mut buf);
            let wide: Vec<u32> = codes.iter().map(|&c| c as u32).collect();
            prop_assert_eq!(&buf, &pack(&wide, width));
            let mut back = vec![0u32; codes.len()];
            unpack(&buf, width, &mut back);
            prop_assert_eq!(back, wide);
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
    fn append_raw_continues_the_stream() {
        for pending in 0..40u32 {
            for added in [0usize, 1, 7, 8, 13, 64, 200] {
                // A reused vector (as from `buf::scratch`): its stale bytes must not show through
                // the bits the kernel ORs in.
                let mut w = BitWriter::from_vec(vec![0xab; 300]);
                let mut plain = BitWriter::default();
                for i in 0..pending {
                    w.put(i & 1, 1);
                    plain.put(i & 1, 1);
                }
                // Append `added` bits of the pattern 1, 1, 0, 1, 1, 0, ... by hand, in bytes.
                let bit = |j: usize| (j % 3 != 2) as u32;
                w.append_raw(added.div_ceil(8) + 2, |buf, at| {
                    for j in 0..added {
                        let p = at + j;
                        buf[p / 8] |= (bit(j) as u8) << (p % 8);
                    }
                    at + added
                });
                for j in 0..added {
                    plain.put(bit(j), 1);
                }
                w.put(0b101, 3);
                plain.put(0b101, 3);
                assert_eq!(w.bit_len(), plain.bit_len());
                assert_eq!(
                    w.finish(),
                    plain.finish(),
                    "pending {pending} added {added}"
                );
            }
        }
    }

    #[test]
    fn reads_past_the_end_are_zero() {
        let buf = [0xffu8; 3];
        assert_eq!(get(&buf, 20, 8), 0x0f);
        assert_eq!(get(&buf, 100, 8), 0);
    }
}
