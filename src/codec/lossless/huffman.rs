//! Canonical Huffman coding of one byte plane in S interleaved streams (S = 4, or 1 for small
//! planes: the caller says which), table-driven decoding.
//!
//! Block layout (docs/FORMAT.md, "The lossless codec"):
//!
//! ```text
//!   first   u8    lowest symbol with a code
//!   count   u8    number of symbols from `first` that have a length entry, minus one
//!   lengths ceil(count / 2) bytes: 4-bit code lengths, low nibble first, 0 = no code, <= 11
//!   sizes   u32 * (S - 1)   byte lengths of streams 0 .. S - 2 (the last takes the rest)
//!   streams the n symbols cut into S runs of ceil(n / S) (the last shorter), each coded
//!           LSB-first: a code's first bit is the lowest bit of the next byte position
//! ```
//!
//! Codes are canonical (by length, then symbol), so the lengths alone rebuild them. Each stream
//! ends on a whole byte, zero-padded. Decoding looks up 11 bits at a time in a table that yields
//! up to three whole symbols per lookup (exponent codes are 2 to 4 bits long, so most lookups do),
//! and runs four streams side by side so their lookups overlap in the CPU.

/// Longest code; also the decode table's index width.
pub const MAX_LEN: u32 = 11;
const TABLE: usize = 1 << MAX_LEN;
const STREAMS: usize = 4;

/// Byte histogram, eight sub-counts to keep runs of equal bytes from serialising on one counter.
pub fn histogram(data: &[u8]) -> [u32; 256] {
    let mut h = [[0u32; 256]; 8];
    let mut it = data.chunks_exact(8);
    for c in &mut it {
        let w = u64::from_le_bytes(c.try_into().unwrap());
        for (k, t) in h.iter_mut().enumerate() {
            t[(w >> (8 * k)) as u8 as usize] += 1;
        }
    }
    for &b in it.remainder() {
        h[0][b as usize] += 1;
    }
    let mut out = [0u32; 256];
    for (i, o) in out.iter_mut().enumerate() {
        *o = h.iter().map(|t| t[i]).sum();
    }
    out
}

/// Code lengths (0 for absent symbols), limited to `MAX_LEN`. Needs at least two symbols
/// present; deterministic for a given histogram.
pub fn code_lengths(hist: &[u32; 256]) -> [u8; 256] {
    let mut syms: Vec<(u32, u8)> = (0..256)
        .filter(|&s| hist[s] > 0)
        .map(|s| (hist[s], s as u8))
        .collect();
    syms.sort_unstable();
    let m = syms.len();
    debug_assert!(m >= 2);
    // Two-queue Huffman: leaves in ascending weight, internal nodes appended in ascending weight.
    let mut w: Vec<u64> = syms.iter().map(|s| s.0 as u64).collect();
    w.resize(2 * m - 1, 0);
    let mut parent = vec![0usize; 2 * m - 1];
    let (mut leaf, mut node) = (0usize, m);
    for next in m..2 * m - 1 {
        let mut pick = || {
            if leaf < m && (node >= next || w[leaf] <= w[node]) {
                leaf += 1;
                leaf - 1
            } else {
                node += 1;
                node - 1
            }
        };
        let (a, b) = (pick(), pick());
        w[next] = w[a] + w[b];
        parent[a] = next;
        parent[b] = next;
    }
    let mut depth = vec![0u32; 2 * m - 1];
    for i in (0..2 * m - 2).rev() {
        depth[i] = depth[parent[i]] + 1;
    }
    let mut len: Vec<u32> = depth[..m].to_vec();
    // Length limit: clamp, then lengthen the rarest short codes until the Kraft sum fits, then
    // shorten the most frequent codes while it still fits.
    let cap = 1u64 << MAX_LEN;
    let mut kraft: u64 = 0;
    for l in len.iter_mut() {
        *l = (*l).min(MAX_LEN);
        kraft += 1 << (MAX_LEN - *l);
    }
    while kraft > cap {
        for l in len.iter_mut() {
            if *l < MAX_LEN {
                kraft -= 1 << (MAX_LEN - *l - 1);
                *l += 1;
                if kraft <= cap {
                    break;
                }
            }
        }
    }
    for l in len.iter_mut().rev() {
        while *l > 1 && kraft + (1 << (MAX_LEN - *l)) <= cap {
            kraft += 1 << (MAX_LEN - *l);
            *l -= 1;
        }
    }
    let mut out = [0u8; 256];
    for (&(_, s), &l) in syms.iter().zip(&len) {
        out[s as usize] = l as u8;
    }
    out
}

/// Canonical codes, bit-reversed for LSB-first output. None when the lengths over-fill the
/// code space or exceed `MAX_LEN` (a corrupt table).
fn canonical(lens: &[u8; 256]) -> Option<[u16; 256]> {
    let mut count = [0u32; MAX_LEN as usize + 1];
    let mut kraft = 0u32;
    for &l in lens {
        if l as u32 > MAX_LEN {
            return None;
        }
        if l > 0 {
            count[l as usize] += 1;
            kraft += 1 << (MAX_LEN - l as u32);
        }
    }
    if kraft > 1 << MAX_LEN {
        return None;
    }
    let mut next = [0u32; MAX_LEN as usize + 1];
    let mut code = 0u32;
    for l in 1..=MAX_LEN as usize {
        code = (code + count[l - 1]) << 1;
        next[l] = code;
    }
    let mut codes = [0u16; 256];
    for (s, &l) in lens.iter().enumerate() {
        if l > 0 {
            let c = next[l as usize];
            next[l as usize] += 1;
            codes[s] = ((c as u16).reverse_bits()) >> (16 - l as u32);
        }
    }
    Some(codes)
}

/// Bytes of the block for this histogram and these lengths, in `streams` streams (1 or 4).
pub fn block_size(hist: &[u32; 256], lens: &[u8; 256], streams: usize) -> usize {
    let (_, count) = span(lens);
    // Streams each round up to a byte: bound by the total bits plus one byte per stream.
    2 + count.div_ceil(2) + 4 * (streams - 1) + total_bits(hist, lens).div_ceil(8) + streams
}

/// Bits of all the codes of a plane with this histogram.
fn total_bits(hist: &[u32; 256], lens: &[u8; 256]) -> usize {
    let bits: u64 = hist
        .iter()
        .zip(lens)
        .map(|(&c, &l)| c as u64 * l as u64)
        .sum();
    bits as usize
}

fn span(lens: &[u8; 256]) -> (usize, usize) {
    let first = lens.iter().position(|&l| l > 0).unwrap_or(0);
    let last = lens.iter().rposition(|&l| l > 0).unwrap_or(0);
    (first, last + 1 - first)
}

/// Appends the block for `data` coded with `lens` (from `code_lengths` of `hist`, its
/// histogram) in `streams` streams: 4, or 1 (no stream sizes; small planes).
pub fn encode(data: &[u8], hist: &[u32; 256], lens: &[u8; 256], streams: usize, out: &mut Vec<u8>) {
    debug_assert!(streams == 1 || streams == STREAMS);
    let table = CodeTable::new(lens);
    let (first, count) = span(lens);
    out.push(first as u8);
    out.push((count - 1) as u8);
    for pair in lens[first..first + count].chunks(2) {
        out.push(pair[0] | pair.get(1).map_or(0, |&h| h << 4));
    }
    let sizes_at = out.len();
    out.resize(sizes_at + 4 * (streams - 1), 0);
    // The streams take the plane's total bits plus at most a byte each; 8 more bytes take the
    // last stream's closing whole-word store.
    let mut pos = out.len();
    out.resize(pos + total_bits(hist, lens).div_ceil(8) + streams + 8, 0);
    let q = data.len().div_ceil(streams).max(1);
    for (k, run) in data
        .chunks(q)
        .chain(std::iter::repeat(&[][..]))
        .take(streams)
        .enumerate()
    {
        let len = encode_stream(run, &table, &mut out[pos..]);
        if k < streams - 1 {
            out[sizes_at + 4 * k..sizes_at + 4 * k + 4]
                .copy_from_slice(&(len as u32).to_le_bytes());
        }
        pos += len;
    }
    out.truncate(pos);
}

/// Each symbol's code (canonical, bit-reversed for LSB-first output) and length, in two
/// tables so that each feeds its shift or add straight from memory.
struct CodeTable {
    code: [u64; 256],
    len: [u32; 256],
}

impl CodeTable {
    fn new(lens: &[u8; 256]) -> Self {
        let codes = canonical(lens).expect("code_lengths makes a valid code");
        CodeTable {
            code: std::array::from_fn(|s| codes[s] as u64),
            len: std::array::from_fn(|s| lens[s] as u32),
        }
    }
}

crate::simd::multiversion!(
    /// Codes one run LSB-first at the start of `buf`, which holds its bytes and 8 more (a
    /// stream's closing store writes a whole word); returns its byte length. (BMI2's shifts by
    /// a register take the code straight from the table, one instruction each.)
    fn encode_stream(run: &[u8], table: &CodeTable, buf: &mut [u8]) -> usize
        = encode_stream_body {
        let (mut acc, mut nbits, mut pos) = (0u64, 0u32, 0usize);
        let mut it = run.chunks_exact(5);
        for c in &mut it {
            // 5 codes of <= 11 bits on top of <= 7 pending bits: at most 62 bits, so at most 7
            // whole bytes leave and the shift stays under 64.
            for &s in c {
                acc |= table.code[s as usize] << nbits;
                nbits += table.len[s as usize];
            }
            buf[pos..pos + 8].copy_from_slice(&acc.to_le_bytes());
            pos += (nbits >> 3) as usize;
            acc >>= nbits & 56;
            nbits &= 7;
        }
        for &s in it.remainder() {
            acc |= table.code[s as usize] << nbits;
            nbits += table.len[s as usize];
        }
        buf[pos..pos + 8].copy_from_slice(&acc.to_le_bytes());
        pos + nbits.div_ceil(8) as usize
    }
);

/// A multi-symbol decode entry holds up to three symbols in bits 0..24, the bits they take in
/// bits 24..30 and their count in bits 30..32 (so a shift by `entry >> USED_SHIFT`, which
/// uses the low 6 bits of the amount, skips exactly the bits taken).
const USED_SHIFT: u32 = 24;
const COUNT_SHIFT: u32 = 30;

/// A block's code lengths and canonical codes, and its streams (a one-stream block's last
/// three are empty).
struct Block<'a> {
    lens: [u8; 256],
    codes: [u16; 256],
    streams: [&'a [u8]; STREAMS],
}

/// Reads the header (code lengths, stream sizes) of a block of `streams` streams. Errors name
/// what is wrong.
fn parse_block(src: &[u8], streams: usize) -> Result<Block<'_>, String> {
    if src.len() < 2 {
        return Err("Huffman block shorter than its header".into());
    }
    let first = src[0] as usize;
    let count = src[1] as usize + 1;
    if first + count > 256 {
        return Err(format!(
            "Huffman table spans symbols {first}..{}",
            first + count
        ));
    }
    let table_end = 2 + count.div_ceil(2) + 4 * (streams - 1);
    if src.len() < table_end {
        return Err(format!(
            "Huffman block of {} bytes cannot hold its {table_end}-byte header",
            src.len()
        ));
    }
    let mut lens = [0u8; 256];
    for i in 0..count {
        let b = src[2 + i / 2];
        lens[first + i] = if i % 2 == 0 { b & 15 } else { b >> 4 };
    }
    let codes = canonical(&lens).ok_or("Huffman code lengths are invalid")?;
    if lens.iter().all(|&l| l == 0) {
        return Err("Huffman table has no symbols".into());
    }
    let sizes = &src[table_end - 4 * (streams - 1)..table_end];
    let mut bounds = [0usize; STREAMS + 1];
    bounds[0] = table_end;
    for k in 0..STREAMS - 1 {
        let s = match sizes.get(4 * k..4 * k + 4) {
            Some(b) => u32::from_le_bytes(b.try_into().unwrap()) as usize,
            // One stream: it is the whole rest of the block, the other three are empty.
            None => src.len() - bounds[k],
        };
        bounds[k + 1] = bounds[k]
            .checked_add(s)
            .filter(|&e| e <= src.len())
            .ok_or("Huffman stream sizes exceed the block")?;
    }
    bounds[STREAMS] = src.len();
    Ok(Block {
        lens,
        codes,
        streams: std::array::from_fn(|k| &src[bounds[k]..bounds[k + 1]]),
    })
}

/// Decodes a block of `streams` streams (1 or 4) into `out` (its length is the symbol count),
/// fetching the `ahead` memory into cache as it goes. Errors name what is wrong.
pub fn decode(
    src: &[u8],
    out: &mut [u8],
    ahead: &[(*const u8, usize)],
    streams: usize,
) -> Result<(), String> {
    debug_assert!(streams == 1 || streams == STREAMS);
    let one = streams == 1;
    let q = out.len().div_ceil(streams).max(1);
    let Block {
        lens,
        codes,
        streams,
    } = parse_block(src, streams)?;
    let (single, multi) = decode_tables(&lens, &codes);
    let mut outs: Vec<&mut [u8]> = out.chunks_mut(q).collect();
    while outs.len() < STREAMS {
        outs.push(&mut []);
    }
    let mut cur = [Cursor { bit: 0, at: 0 }; STREAMS];
    let mut fetch = Prefetch::new(ahead, q);
    decode_fast(&multi, &streams, &mut outs, &mut cur, &mut fetch, one);
    // Tails: one symbol at a time with a zero-padded read.
    for k in 0..STREAMS {
        let s = streams[k];
        let o = &mut *outs[k];
        let (mut b, mut a) = (cur[k].bit, cur[k].at);
        while a < o.len() {
            let p = b >> 3;
            let w = if p + 8 <= s.len() {
                u64::from_le_bytes(s[p..p + 8].try_into().unwrap())
            } else {
                let mut t = [0u8; 8];
                let avail = s.len().saturating_sub(p);
                t[..avail].copy_from_slice(&s[p.min(s.len())..]);
                u64::from_le_bytes(t)
            } >> (b & 7);
            let e = single[(w & (TABLE as u64 - 1)) as usize];
            o[a] = e as u8;
            a += 1;
            b += (e >> 8) as usize;
        }
        if b.div_ceil(8) != s.len() {
            return Err(format!(
                "Huffman stream {k} holds {} bytes, its {} symbols take {}",
                s.len(),
                o.len(),
                b.div_ceil(8)
            ));
        }
    }
    Ok(())
}

/// The decode tables of a code: single-symbol entries (sym | len << 8; entries no code
/// reaches keep length `MAX_LEN`) and multi-symbol entries (as many whole symbols, up to three,
/// as `MAX_LEN` bits hold; layout at [`USED_SHIFT`]).
fn decode_tables(lens: &[u8; 256], codes: &[u16; 256]) -> ([u16; TABLE], [u32; TABLE]) {
    let mut single = [(MAX_LEN as u16) << 8; TABLE];
    for s in 0..256 {
        let l = lens[s] as u32;
        if l > 0 {
            let mut i = codes[s] as usize;
            while i < TABLE {
                single[i] = s as u16 | (l as u16) << 8;
                i += 1 << l;
            }
        }
    }
    let mut multi = [0u32; TABLE];
    for (idx, m) in multi.iter_mut().enumerate() {
        let mut syms = 0u32;
        let (mut used, mut n, mut rest) = (0u32, 0u32, idx);
        while n < 3 {
            let e = single[rest];
            let l = (e >> 8) as u32;
            if used + l > MAX_LEN {
                break;
            }
            syms |= ((e & 0xff) as u32) << (8 * n);
            used += l;
            n += 1;
            rest >>= l;
        }
        *m = syms | used << USED_SHIFT | n << COUNT_SHIFT;
    }
    (single, multi)
}

/// Memory the caller reads or writes right after a decode, brought into cache a few lines per
/// round of the fast loop: its table lookups leave the memory system idle, so the pass that
/// follows (joining the planes into the output) finds its input and output in cache instead
/// of waiting on memory.
struct Prefetch<'a> {
    ranges: &'a [(*const u8, usize)],
    range: usize,
    offset: usize,
    per_round: usize,
}

impl<'a> Prefetch<'a> {
    /// Spread over the fewest rounds streams of `per_stream` symbols can take (a round writes
    /// at most `ROUND_SYMS` per stream).
    fn new(ranges: &'a [(*const u8, usize)], per_stream: usize) -> Self {
        let lines: usize = ranges.iter().map(|r| r.1.div_ceil(64)).sum();
        let rounds = (per_stream / ROUND_SYMS).max(1);
        Prefetch {
            ranges,
            range: 0,
            offset: 0,
            per_round: lines.div_ceil(rounds),
        }
    }

    #[inline(always)]
    fn step(&mut self) {
        for _ in 0..self.per_round {
            let Some(&(start, len)) = self.ranges.get(self.range) else {
                return;
            };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch is a hint: it reads nothing and cannot fault, whatever the
            // address.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(self.offset).cast());
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = start;
            self.offset += 64;
            if self.offset >= len {
                self.range += 1;
                self.offset = 0;
            }
        }
    }
}

/// Where one stream's decoding stands: bits read, symbols written.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cursor {
    bit: usize,
    at: usize,
}

/// Lookups per 64-bit read: 5 of at most `MAX_LEN` bits fit the 57 bits past its first byte.
const LOOKUPS: usize = 5;
/// Most bits one round (`LOOKUPS` lookups) reads from a stream, most symbols it writes.
const ROUND_BITS: usize = LOOKUPS * MAX_LEN as usize;
const ROUND_SYMS: usize = LOOKUPS * 3;

crate::simd::multiversion!(
    /// Decodes the four streams side by side (stream 0 alone when `one`: a one-stream block)
    /// while each has 8 readable bytes and 16 writable ones left, and leaves `cur` where
    /// single-symbol decoding takes over.
    fn decode_fast(
        multi: &[u32; TABLE],
        streams: &[&[u8]; STREAMS],
        outs: &mut [&mut [u8]],
        cur: &mut [Cursor; STREAMS],
        fetch: &mut Prefetch,
        one: bool,
    ) = decode_fast_streams {
        if one {
            decode_fast_body::<1>(multi, streams, outs, cur, fetch)
        } else {
            decode_fast_body::<STREAMS>(multi, streams, outs, cur, fetch)
        }
    }
);

/// The fast loop over the first `S` streams (the others are left as they are).
#[inline(always)]
fn decode_fast_body<const S: usize>(
    multi: &[u32; TABLE],
    streams: &[&[u8]; STREAMS],
    outs: &mut [&mut [u8]],
    cur: &mut [Cursor; STREAMS],
    fetch: &mut Prefetch,
) {
    loop {
        // Rounds every stream can take with no check: round j reads 8 bytes from byte
        // (bit + j * ROUND_BITS) / 8, in bounds while bit + j * ROUND_BITS <= (s - 8) * 8 + 7,
        // and writes 4 bytes at up to at + j * ROUND_SYMS + ROUND_SYMS - 3, in bounds while
        // at + j * ROUND_SYMS + 16 <= o; the checks just below make both hold for j = 0.
        let mut rounds = usize::MAX;
        for (k, c) in cur.iter().enumerate().take(S) {
            let (s, o) = (streams[k].len(), outs[k].len());
            if (c.bit >> 3) + 8 > s || c.at + 16 > o {
                return;
            }
            let by_src = ((s - 8) * 8 + 7 - c.bit) / ROUND_BITS + 1;
            let by_out = (o - 16 - c.at) / ROUND_SYMS + 1;
            rounds = rounds.min(by_src).min(by_out);
        }
        let src: [*const u8; STREAMS] = std::array::from_fn(|k| streams[k].as_ptr());
        let dst: [*mut u8; STREAMS] = std::array::from_fn(|k| outs[k].as_mut_ptr());
        for _ in 0..rounds {
            fetch.step();
            for k in 0..S {
                let Cursor { bit, at } = cur[k];
                // SAFETY: `rounds` keeps this 8-byte read inside stream k (see above).
                let mut w = unsafe { src[k].add(bit >> 3).cast::<u64>().read_unaligned() };
                w >>= bit & 7;
                let (mut a, mut used) = (at, 0usize);
                for _ in 0..LOOKUPS {
                    let e = multi[(w & (TABLE as u64 - 1)) as usize];
                    // SAFETY: `rounds` keeps this 4-byte write inside output k (see above).
                    unsafe { dst[k].add(a).cast::<u32>().write_unaligned(e.to_le()) };
                    a += (e >> COUNT_SHIFT) as usize;
                    let l = (e >> USED_SHIFT) as usize & 63;
                    w >>= l;
                    used += l;
                }
                cur[k] = Cursor {
                    bit: bit + used,
                    at: a,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Codes `data` in `streams` streams after one byte already in the buffer, checks the
    /// block's size bound and decodes it back; returns the buffer.
    fn round_trip(data: &[u8], streams: usize) -> Vec<u8> {
        let h = histogram(data);
        let lens = code_lengths(&h);
        let mut blk = vec![0xAA];
        encode(data, &h, &lens, streams, &mut blk);
        // block_size bounds the block (each stream rounds up on its own) within a few bytes.
        let bound = block_size(&h, &lens, streams);
        assert!(bound >= blk.len() - 1 && bound - (blk.len() - 1) <= streams);
        let mut out = vec![0u8; data.len()];
        decode(&blk[1..], &mut out, &[], streams).unwrap();
        assert_eq!(out, data);
        blk
    }

    #[test]
    fn round_trips_skewed_uniform_and_tiny_inputs() {
        let mut rng = crate::rng::SplitMix64::new(3);
        let skewed: Vec<u8> = (0..100_003)
            .map(|_| (rng.next_u64().trailing_zeros().min(40) + 100) as u8)
            .collect();
        let uniform: Vec<u8> = (0..70_001).map(|_| rng.next_u64() as u8).collect();
        for streams in [1, STREAMS] {
            round_trip(&skewed, streams);
            round_trip(&uniform, streams);
            for n in [2usize, 3, 5, 17, 63, 64, 65] {
                let v: Vec<u8> = (0..n).map(|i| (i % 3) as u8 * 7).collect();
                round_trip(&v, streams);
            }
        }
        // One stream spares the three sizes and the padding of the other three.
        let small: Vec<u8> = skewed[..1000].to_vec();
        assert!(round_trip(&small, 1).len() + 12 <= round_trip(&small, STREAMS).len());
    }

    /// The BMI2 builds of the coding loops give what the portable ones give.
    #[test]
    fn simd_and_portable_loops_agree() {
        let mut rng = crate::rng::SplitMix64::new(11);
        let data: Vec<u8> = (0..40_003)
            .map(|_| (rng.next_u64().trailing_zeros().min(30) + 7) as u8)
            .collect();
        let hist = histogram(&data);
        let lens = code_lengths(&hist);
        let table = CodeTable::new(&lens);
        let room = total_bits(&hist, &lens).div_ceil(8) + 9;
        let (mut a, mut b) = (vec![0u8; room], vec![0u8; room]);
        let la = encode_stream(&data, &table, &mut a);
        let lb = encode_stream_body(&data, &table, &mut b);
        assert_eq!((la, &a), (lb, &b));

        for count in [1, STREAMS] {
            let mut blk = Vec::new();
            encode(&data, &hist, &lens, count, &mut blk);
            let mut out = vec![0u8; data.len()];
            decode(&blk, &mut out, &[], count).unwrap();
            assert_eq!(out, data);
            // The fast loop alone, both builds, from the start of the block's streams.
            let (a, b) = (
                decode_streams(&blk, data.len(), count, true),
                decode_streams(&blk, data.len(), count, false),
            );
            assert!(a.1[0].at > data.len() / count / 2, "{count}");
            assert_eq!(a, b);
        }
    }

    /// A stream whose read position sits in its last readable word, past the word's first
    /// bit, gets exactly the rounds that stay inside it.
    #[test]
    fn fast_loop_bounds_hold_mid_byte_at_the_end_of_a_stream() {
        let lens: [u8; 256] = std::array::from_fn(|s| if s < 2 { 1 } else { 0 });
        let (_, multi) = decode_tables(&lens, &canonical(&lens).unwrap());
        let bytes = [0x5au8; 16];
        let streams: [&[u8]; STREAMS] = [&bytes; STREAMS];
        let mut out = vec![0u8; 4 * 1000];
        let mut outs: Vec<&mut [u8]> = out.chunks_mut(1000).collect();
        // (16 - 8) * 8 + 5: the last word that can be read whole, five bits in.
        let mut cur = [Cursor { bit: 69, at: 0 }; STREAMS];
        decode_fast_body::<STREAMS>(
            &multi,
            &streams,
            &mut outs,
            &mut cur,
            &mut Prefetch::new(&[], 1),
        );
        for c in cur {
            // One round: 5 lookups of 3 one-bit symbols each.
            assert_eq!(
                c,
                Cursor {
                    bit: 69 + 15,
                    at: 15
                }
            );
        }
    }

    /// Runs only the fast loop of [`decode`] on `blk` (`n` symbols in `count` streams), the
    /// run-time dispatched build or the portable one: the symbols written and the cursors.
    fn decode_streams(
        blk: &[u8],
        n: usize,
        count: usize,
        dispatch: bool,
    ) -> (Vec<u8>, Vec<Cursor>) {
        let Block {
            lens,
            codes,
            streams,
        } = parse_block(blk, count).unwrap();
        let (_, multi) = decode_tables(&lens, &codes);
        let mut out = vec![0u8; n];
        let q = n.div_ceil(count);
        let mut outs: Vec<&mut [u8]> = out.chunks_mut(q).collect();
        outs.resize_with(STREAMS, Default::default);
        let mut cur = [Cursor { bit: 0, at: 0 }; STREAMS];
        let fetch = &mut Prefetch::new(&[], q);
        let one = count == 1;
        if dispatch {
            decode_fast(&multi, &streams, &mut outs, &mut cur, fetch, one);
        } else {
            decode_fast_streams(&multi, &streams, &mut outs, &mut cur, fetch, one);
        }
        (out, cur.to_vec())
    }

    #[test]
    fn lengths_are_limited_and_fill_the_code_space() {
        // Fibonacci-like counts force a deep tree.
        let mut h = [0u32; 256];
        let (mut a, mut b) = (1u32, 1u32);
        for c in h.iter_mut().take(40) {
            *c = a;
            (a, b) = (b, a.saturating_add(b).min(1 << 30));
        }
        let lens = code_lengths(&h);
        assert!(lens.iter().all(|&l| l as u32 <= MAX_LEN));
        let kraft: u32 = lens
            .iter()
            .filter(|&&l| l > 0)
            .map(|&l| 1 << (MAX_LEN - l as u32))
            .sum();
        assert_eq!(kraft, 1 << MAX_LEN);
        assert_eq!(lens.iter().filter(|&&l| l > 0).count(), 40);
    }

    #[test]
    fn corrupt_blocks_are_errors_not_panics() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * i % 13) as u8).collect();
        for streams in [1, STREAMS] {
            let blk = round_trip(&data, streams)[1..].to_vec();
            let mut out = vec![0u8; data.len()];
            for cut in 0..blk.len().min(64) {
                assert!(decode(&blk[..cut], &mut out, &[], streams).is_err());
            }
            let mut errors = 0;
            for i in 0..blk.len() {
                for flip in [1u8, 0x10, 0xff] {
                    let mut b = blk.clone();
                    b[i] ^= flip;
                    errors += decode(&b, &mut out, &[], streams).is_err() as usize;
                }
            }
            assert!(errors > 0);
        }
    }
}
