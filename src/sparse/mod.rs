//! Sparse Linear layers: a weight in CSR (compressed sparse rows) and the three products of
//! training with it, forward `Y = X W^T + b`, input gradient `dX = dY W`, and the weight gradient
//! at the non-zeros only (`dW(o, i) = dY[:, o] . X[:, i]`) with the bias gradient.
//!
//! Activations are held batch-innermost: `X^T` is `in x B` row-major (one input feature's values
//! over the batch are contiguous), `Y^T` and `dY^T` are `out x B`. Every inner loop then runs along
//! the batch with a scalar weight broadcast, so it vectorises without gathers. Rows are `ld >= B`
//! floats apart: a row stride of a large power of two bytes (B = 2048) maps the rows of a batch
//! tile onto a few cache sets, which then evict each other; [`padded_ld`] gives a stride that
//! does not.
//!
//! - forward: one task per block of output rows; for each batch tile (kept in L2 across the
//!   block's rows) and each row, the row's non-zeros are folded into accumulators held in
//!   registers: `y = fma(w, x, y)` in the row's column order.
//! - dX: the same kernel over the transposed pattern (built once, with the position of each entry
//!   in the CSR order), one task per block of input rows: no two tasks write the same row.
//! - dW: one task per block of output rows, each writing only its rows' slice of the non-zero
//!   gradient; the dot over the batch is cut in tiles of [`DOT_TILE`] with 16 lane sums each.
//!
//! Each output element is computed in one fixed order at every SIMD level (portable, AVX2,
//! AVX-512): the same bits at every level, which the tests check.

use crate::error::{Error, Result};

#[cfg(target_arch = "x86_64")]
mod x86;

/// The batch tile of the weight-gradient dot products: each is summed over tiles of this many
/// batch entries (16 lanes, then a fixed tree), and the tile sums are added in order.
pub const DOT_TILE: usize = 128;

/// Largest batch tile of the forward and dX kernels (a multiple of 16).
const SPMM_TILE: usize = 128;
/// Bytes of the input's batch tile the forward and dX kernels aim to keep in L2 (3/4 of the 2 MiB
/// of current server cores; a full 128-wide tile of a 3072-row input).
const TILE_BYTES: usize = 3 << 19;

/// Column (or row) indices, in the narrowest type that holds them.
#[derive(Debug, Clone, PartialEq)]
pub enum Indices {
    /// Every index is below 65536.
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl Indices {
    fn new(v: impl Iterator<Item = usize>, bound: usize) -> Self {
        if bound <= 1 << 16 {
            Indices::U16(v.map(|x| x as u16).collect())
        } else {
            Indices::U32(v.map(|x| x as u32).collect())
        }
    }
    /// Bytes per index (2 or 4).
    pub fn width(&self) -> usize {
        match self {
            Indices::U16(_) => 2,
            Indices::U32(_) => 4,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Indices::U16(v) => v.len(),
            Indices::U32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, k: usize) -> usize {
        match self {
            Indices::U16(v) => v[k] as usize,
            Indices::U32(v) => v[k] as usize,
        }
    }
}

/// An index type the kernels read.
pub(crate) trait Index: Copy + Send + Sync + 'static {
    fn at(self) -> usize;
}
impl Index for u16 {
    #[inline(always)]
    fn at(self) -> usize {
        self as usize
    }
}
impl Index for u32 {
    #[inline(always)]
    fn at(self) -> usize {
        self as usize
    }
}

/// The SIMD level a kernel runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    Avx2,
    Avx512,
}

impl Level {
    /// The best level this CPU runs (through `crate::simd`).
    pub fn best() -> Level {
        if crate::simd::avx512() {
            Level::Avx512
        } else if crate::simd::avx2() {
            Level::Avx2
        } else {
            Level::Portable
        }
    }
    /// `self`, or the best level this CPU runs if that is lower.
    pub fn usable(self) -> Level {
        self.min(Level::best())
    }
}

/// The non-zero pattern of an `rows x cols` weight (a Linear's `out x in`) in CSR, with its
/// transpose. Values live outside (they change at every optimizer step; the pattern does not).
#[derive(Debug, Clone, PartialEq)]
pub struct Csr {
    rows: usize,
    cols: usize,
    ptr: Vec<usize>,
    idx: Indices,
    t_ptr: Vec<usize>,
    t_idx: Indices,
    /// For each entry of the transpose, its position in the CSR order.
    t_perm: Vec<u32>,
}

fn layout(msg: String) -> Error {
    Error::Layout(msg)
}

impl Csr {
    /// A pattern from CSR arrays: `row_ptr` has `rows + 1` non-decreasing entries from 0 to
    /// `col_idx.len()`, and each row's column indices are strictly increasing and below `cols`.
    pub fn new(rows: usize, cols: usize, row_ptr: &[i64], col_idx: &[i64]) -> Result<Csr> {
        if row_ptr.len() != rows + 1 {
            return Err(layout(format!(
                "row pointers have {} entries; expected rows + 1 = {}",
                row_ptr.len(),
                rows + 1
            )));
        }
        if row_ptr[0] != 0 {
            return Err(layout(format!(
                "row pointers must start at 0, found {}",
                row_ptr[0]
            )));
        }
        let nnz = col_idx.len();
        if nnz > u32::MAX as usize {
            return Err(layout(format!(
                "{nnz} non-zeros; at most {} are supported",
                u32::MAX
            )));
        }
        for r in 0..rows {
            let (a, b) = (row_ptr[r], row_ptr[r + 1]);
            if b < a || b as u64 > nnz as u64 {
                return Err(layout(format!(
                    "row pointers must be non-decreasing and at most {nnz} (the number of column \
                     indices); row {r} spans {a}..{b}"
                )));
            }
            let mut prev = -1i64;
            for &c in &col_idx[a as usize..b as usize] {
                if c < 0 || c as u64 >= cols as u64 {
                    return Err(layout(format!(
                        "row {r} has column index {c}; expected 0 <= index < {cols}"
                    )));
                }
                if c <= prev {
                    return Err(layout(format!(
                        "row {r}: column indices must be strictly increasing, found {c} after {prev}"
                    )));
                }
                prev = c;
            }
        }
        if row_ptr[rows] as u64 != nnz as u64 {
            return Err(layout(format!(
                "the last row pointer is {}; expected the number of column indices, {nnz}",
                row_ptr[rows]
            )));
        }
        let ptr: Vec<usize> = row_ptr.iter().map(|&p| p as usize).collect();
        // The transpose: counting sort by column, rows ascending within each column.
        let mut t_ptr = vec![0usize; cols + 1];
        for &c in col_idx {
            t_ptr[c as usize + 1] += 1;
        }
        for i in 0..cols {
            t_ptr[i + 1] += t_ptr[i];
        }
        let mut next = t_ptr.clone();
        let mut t_rows = vec![0usize; nnz];
        let mut t_perm = vec![0u32; nnz];
        for r in 0..rows {
            for (j, &c) in col_idx[ptr[r]..ptr[r + 1]].iter().enumerate() {
                let (k, c) = (ptr[r] + j, c as usize);
                t_rows[next[c]] = r;
                t_perm[next[c]] = k as u32;
                next[c] += 1;
            }
        }
        Ok(Csr {
            rows,
            cols,
            idx: Indices::new(col_idx.iter().map(|&c| c as usize), cols),
            ptr,
            t_ptr,
            t_idx: Indices::new(t_rows.into_iter(), rows),
            t_perm,
        })
    }

    /// The pattern of the non-zeros of a dense row-major `rows x cols` matrix, and their values.
    pub fn from_dense(rows: usize, cols: usize, w: &[f32]) -> Result<(Csr, Vec<f32>)> {
        if w.len() != rows * cols {
            return Err(layout(format!(
                "dense weight has {} elements; expected {rows} x {cols} = {}",
                w.len(),
                rows * cols
            )));
        }
        let mut ptr = vec![0i64];
        let mut idx = Vec::new();
        let mut vals = Vec::new();
        for r in 0..rows {
            for (c, &v) in w[r * cols..(r + 1) * cols].iter().enumerate() {
                if v != 0.0 {
                    idx.push(c as i64);
                    vals.push(v);
                }
            }
            ptr.push(idx.len() as i64);
        }
        Ok((Csr::new(rows, cols, &ptr, &idx)?, vals))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn nnz(&self) -> usize {
        self.idx.len()
    }
    /// Row pointers (`rows + 1`).
    pub fn row_ptr(&self) -> &[usize] {
        &self.ptr
    }
    /// Column indices (2 bytes each when `cols <= 65536`, else 4).
    pub fn col_idx(&self) -> &Indices {
        &self.idx
    }
    /// Bytes of the pattern as the kernels read it: row pointers as u32 or u64 would be stored
    /// plus the column indices (the transpose is not counted).
    pub fn index_nbytes(&self) -> usize {
        self.nnz() * self.idx.width()
    }

    /// The dense row-major matrix with `values` at the non-zeros.
    pub fn to_dense(&self, values: &[f32]) -> Result<Vec<f32>> {
        self.check_values(values)?;
        let mut w = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for k in self.ptr[r]..self.ptr[r + 1] {
                w[r * self.cols + self.idx.get(k)] = values[k];
            }
        }
        Ok(w)
    }

    fn check_values(&self, values: &[f32]) -> Result<()> {
        if values.len() != self.nnz() {
            return Err(layout(format!(
                "values have {} elements; the pattern has {} non-zeros",
                values.len(),
                self.nnz()
            )));
        }
        Ok(())
    }
}

/// A row stride (in floats) for `batch`-wide batch-innermost arrays: `batch` rounded up to 16,
/// plus 16 when that is a multiple of 256 (1 KiB), so that successive rows start in different
/// cache sets.
pub fn padded_ld(batch: usize) -> usize {
    let ld = batch.div_ceil(16) * 16;
    if ld.is_multiple_of(256) && ld > 0 {
        ld + 16
    } else {
        ld
    }
}

fn check_len(what: &str, len: usize, a: usize, an: &str, ld: usize) -> Result<()> {
    if len != a * ld {
        return Err(layout(format!(
            "{what} has {len} elements; expected {an} x row stride = {a} x {ld} = {}",
            a * ld
        )));
    }
    Ok(())
}

/// A per-row or per-non-zero vector (`bias`, its gradient, the weight gradient) of `len`
/// elements, where `want` (`want_name`) are expected.
fn check_count(what: &str, len: usize, want: usize, want_name: &str) -> Result<()> {
    if len != want {
        return Err(layout(format!(
            "{what} has {len} elements; expected {want_name}, {want}"
        )));
    }
    Ok(())
}

/// `$body` with `$i` bound to the column indices of `$idx`, whichever width they have.
macro_rules! with_indices {
    ($idx:expr, $i:ident => $body:expr) => {
        match $idx {
            Indices::U16($i) => $body,
            Indices::U32($i) => $body,
        }
    };
}

fn check_ld(batch: usize, ld: usize) -> Result<()> {
    if ld < batch {
        return Err(layout(format!(
            "row stride {ld} is smaller than the batch {batch}"
        )));
    }
    Ok(())
}

/// Forward: `y_t[o, t] = bias[o] + sum_k values[k] * x_t[col[k], t]` over row `o`'s non-zeros
/// (`x_t` is `cols x ld`, `y_t` is `rows x ld`, both row-major; columns `batch..ld` are neither
/// read nor written).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    csr: &Csr,
    values: &[f32],
    x_t: &[f32],
    batch: usize,
    ld: usize,
    bias: Option<&[f32]>,
    y_t: &mut [f32],
    level: Level,
) -> Result<()> {
    csr.check_values(values)?;
    check_ld(batch, ld)?;
    check_len(
        "input (in_features x batch)",
        x_t.len(),
        csr.cols,
        "in_features",
        ld,
    )?;
    check_len(
        "output (out_features x batch)",
        y_t.len(),
        csr.rows,
        "out_features",
        ld,
    )?;
    if let Some(b) = bias {
        check_count("bias", b.len(), csr.rows, "out_features")?;
    }
    let level = level.usable();
    with_indices!(&csr.idx, i => spmm(level, &csr.ptr, i, values, x_t, batch, ld, bias, y_t));
    Ok(())
}

/// Backward: any of `dx_t = (dY W)^T` (`cols x ld`), `dw` (the gradient at the non-zeros, in
/// CSR order) and `db` (sum of `dy_t` over the batch), from `x_t` (`cols x ld`) and `dy_t`
/// (`rows x ld`), all batch-innermost with row stride `ld`. With `accumulate`, `dw` and `db` are
/// added to rather than overwritten: a batch cut in chunks of a multiple of [`DOT_TILE`] then
/// gives `dw` bit for bit as one call over the whole batch.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    csr: &Csr,
    values: &[f32],
    x_t: &[f32],
    dy_t: &[f32],
    batch: usize,
    ld: usize,
    dx_t: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    accumulate: bool,
    level: Level,
) -> Result<()> {
    let level = level.usable();
    csr.check_values(values)?;
    check_ld(batch, ld)?;
    check_len(
        "input (in_features x batch)",
        x_t.len(),
        csr.cols,
        "in_features",
        ld,
    )?;
    check_len(
        "output gradient (out_features x batch)",
        dy_t.len(),
        csr.rows,
        "out_features",
        ld,
    )?;
    if let Some(d) = &dx_t {
        check_len(
            "input gradient (in_features x batch)",
            d.len(),
            csr.cols,
            "in_features",
            ld,
        )?;
    }
    if let Some(d) = &dw {
        check_count("weight gradient", d.len(), csr.nnz(), "one per non-zero")?;
    }
    if let Some(d) = &db {
        check_count("bias gradient", d.len(), csr.rows, "out_features")?;
    }
    if let Some(dx) = dx_t {
        let t_vals: Vec<f32> = csr.t_perm.iter().map(|&k| values[k as usize]).collect();
        with_indices!(&csr.t_idx, i =>
            spmm(level, &csr.t_ptr, i, &t_vals, dy_t, batch, ld, None, dx));
    }
    if dw.is_some() || db.is_some() {
        with_indices!(&csr.idx, i =>
            grad_w(level, &csr.ptr, i, x_t, dy_t, batch, ld, dw, db, accumulate));
    }
    Ok(())
}

/// `dst[c * dst_ld + r] = src[r * src_ld + c]` for `r < rows`, `c < cols`: the change between
/// the batch-outermost layout of torch (`B x features`) and the kernels' batch-innermost one, in
/// 16 x 16 tiles, one task per block of destination rows. `src` holds `rows x src_ld` floats and
/// `dst` `cols x dst_ld`; the other entries of `dst` are not written.
pub fn transpose(
    src: &[f32],
    rows: usize,
    cols: usize,
    src_ld: usize,
    dst: &mut [f32],
    dst_ld: usize,
) -> Result<()> {
    if src_ld < cols || dst_ld < rows {
        return Err(layout(format!(
            "transpose of {rows} x {cols}: row strides {src_ld} (source) and {dst_ld} \
             (destination) must be at least {cols} and {rows}"
        )));
    }
    if src.len() != rows * src_ld || dst.len() != cols * dst_ld {
        return Err(layout(format!(
            "transpose of {rows} x {cols}: source has {} elements, expected {rows} x {src_ld}; \
             destination has {}, expected {cols} x {dst_ld}",
            src.len(),
            dst.len()
        )));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    const T: usize = 16;
    let per = cols
        .div_ceil(8 * crate::pool::num_threads())
        .div_ceil(T)
        .max(1)
        * T;
    crate::pool::for_each_chunk_mut(dst, per * dst_ld, |ci, chunk| {
        let c0 = ci * per;
        let nc = chunk.len() / dst_ld;
        // Through a 16 x 16 tile: each source row segment and each destination row segment is
        // one full cache line touched once. Writing the destination a float at a time instead
        // keeps 16 partial lines live, which a row stride of a multiple of 4 KiB (3072 floats)
        // maps to one L1 set: they evicted each other (a 25 MB transpose took 40 ms).
        let mut tile = [[0f32; T]; T];
        for r0 in (0..rows).step_by(T) {
            let nr = T.min(rows - r0);
            for cb in (0..nc).step_by(T) {
                let ncb = T.min(nc - cb);
                for (r, t) in tile.iter_mut().enumerate().take(nr) {
                    let row = &src[(r0 + r) * src_ld + c0 + cb..][..ncb];
                    t[..ncb].copy_from_slice(row);
                }
                for c in 0..ncb {
                    let out = &mut chunk[(cb + c) * dst_ld + r0..][..nr];
                    for (r, o) in out.iter_mut().enumerate() {
                        *o = tile[r][c];
                    }
                }
            }
        }
    });
    Ok(())
}

/// Rows per task: about eight tasks per thread, for balance on a shared machine.
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(8 * crate::pool::num_threads()).max(1)
}

/// `out[r, t] = init[r] + sum_k vals[k] * inp[idx[k], t]` for `k` in row `r`'s range of `ptr`,
/// in order, one fused multiply-add per term. Lengths are checked by the caller and every index
/// is below `inp.len() / batch` (checked when the pattern was built).
#[allow(clippy::too_many_arguments)]
fn spmm<I: Index>(
    level: Level,
    ptr: &[usize],
    idx: &[I],
    vals: &[f32],
    inp: &[f32],
    batch: usize,
    ld: usize,
    init: Option<&[f32]>,
    out: &mut [f32],
) {
    let rows = ptr.len() - 1;
    if rows == 0 || batch == 0 {
        return;
    }
    let in_rows = inp.len() / ld;
    let tile = (TILE_BYTES / (4 * in_rows.max(1)) / 16 * 16).clamp(16, SPMM_TILE);
    let per = rows_per_task(rows);
    crate::pool::for_each_chunk_mut(out, per * ld, |ci, chunk| {
        let r0 = ci * per;
        let nr = chunk.len() / ld;
        for t0 in (0..batch).step_by(tile) {
            let w = tile.min(batch - t0);
            for r in 0..nr {
                let (a, b) = (ptr[r0 + r], ptr[r0 + r + 1]);
                let init = init.map_or(0.0, |v| v[r0 + r]);
                let seg = &mut chunk[r * ld + t0..r * ld + t0 + w];
                row(level, &idx[a..b], &vals[a..b], inp, ld, t0, init, seg);
            }
        }
    });
}

/// One output row over the batch segment `t0..t0 + out.len()`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn row<I: Index>(
    level: Level,
    idx: &[I],
    vals: &[f32],
    inp: &[f32],
    ld: usize,
    t0: usize,
    init: f32,
    out: &mut [f32],
) {
    debug_assert!(idx.iter().all(|c| (c.at() + 1) * ld <= inp.len()));
    debug_assert!(t0 + out.len() <= ld);
    match level {
        // SAFETY: the level is usable on this CPU (Level::usable); every index is a row of
        // `inp` and `t0 + out.len() <= ld`, so each read lies inside `inp`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::row512(idx, vals, inp.as_ptr(), ld, t0, init, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::row256(idx, vals, inp.as_ptr(), ld, t0, init, out) },
        _ => row_portable(idx, vals, inp, ld, t0, init, out),
    }
}

fn row_portable<I: Index>(
    idx: &[I],
    vals: &[f32],
    inp: &[f32],
    ld: usize,
    t0: usize,
    init: f32,
    out: &mut [f32],
) {
    out.fill(init);
    for (c, &v) in idx.iter().zip(vals) {
        let x = &inp[c.at() * ld + t0..][..out.len()];
        for (o, &xv) in out.iter_mut().zip(x) {
            *o = v.mul_add(xv, *o);
        }
    }
}

/// The weight gradient at the non-zeros and the bias gradient; one task per block of rows.
#[allow(clippy::too_many_arguments)]
fn grad_w<I: Index>(
    level: Level,
    ptr: &[usize],
    idx: &[I],
    x_t: &[f32],
    dy_t: &[f32],
    batch: usize,
    ld: usize,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    accumulate: bool,
) {
    use rayon::prelude::*;
    let rows = ptr.len() - 1;
    let per = rows_per_task(rows);
    // Disjoint pieces of dw and db, one per block of rows.
    let mut tasks = Vec::new();
    let (mut dw_rest, mut db_rest) = (dw, db);
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + per).min(rows);
        let dw_piece = dw_rest.take().map(|d| {
            let (a, b) = d.split_at_mut(ptr[r1] - ptr[r0]);
            dw_rest = Some(b);
            a
        });
        let db_piece = db_rest.take().map(|d| {
            let (a, b) = d.split_at_mut(r1 - r0);
            db_rest = Some(b);
            a
        });
        tasks.push((r0, r1, dw_piece, db_piece));
        r0 = r1;
    }
    let run = |(r0, r1, dw, db): (usize, usize, Option<&mut [f32]>, Option<&mut [f32]>)| {
        if let Some(db) = db {
            for (r, d) in (r0..r1).zip(db.iter_mut()) {
                let s = lane_sum(&dy_t[r * ld..r * ld + batch]);
                *d = if accumulate { *d + s } else { s };
            }
        }
        let Some(dw) = dw else { return };
        if !accumulate {
            dw.fill(0.0);
        }
        let k0 = ptr[r0];
        for t0 in (0..batch).step_by(DOT_TILE) {
            let w = DOT_TILE.min(batch - t0);
            for r in r0..r1 {
                let (a, b) = (ptr[r], ptr[r + 1]);
                let dy = &dy_t[r * ld + t0..r * ld + t0 + w];
                let out = &mut dw[a - k0..b - k0];
                dots(level, &idx[a..b], dy, x_t, ld, t0, out);
            }
        }
    };
    if crate::pool::parallel(tasks.len()) {
        crate::pool::install(|| tasks.into_par_iter().for_each(run));
    } else {
        tasks.into_iter().for_each(run);
    }
}

/// `out[j] += dot(dy, x_t[idx[j], t0..t0 + dy.len()])` for each `j`, each dot in 16 lanes
/// (lane `l` takes the entries `l, l + 16, ...` by fused multiply-adds) summed by [`tree16`].
fn dots<I: Index>(
    level: Level,
    idx: &[I],
    dy: &[f32],
    x_t: &[f32],
    ld: usize,
    t0: usize,
    out: &mut [f32],
) {
    debug_assert!(dy.len() <= DOT_TILE && t0 + dy.len() <= ld);
    debug_assert!(idx.iter().all(|c| (c.at() + 1) * ld <= x_t.len()));
    match level {
        // SAFETY: as in `row`.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::dots512(idx, dy, x_t.as_ptr(), ld, t0, out) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::dots256(idx, dy, x_t.as_ptr(), ld, t0, out) },
        _ => {
            for (c, o) in idx.iter().zip(out.iter_mut()) {
                let x = &x_t[c.at() * ld + t0..][..dy.len()];
                let mut s = [0f32; 16];
                for (j, (&d, &xv)) in dy.iter().zip(x).enumerate() {
                    s[j % 16] = d.mul_add(xv, s[j % 16]);
                }
                *o += tree16(&s);
            }
        }
    }
}

/// The 16 lane sums added as the vector kernels add them: halves, then quarters, ...
#[inline]
pub(crate) fn tree16(s: &[f32; 16]) -> f32 {
    let mut b = [0f32; 8];
    for j in 0..8 {
        b[j] = s[j] + s[j + 8];
    }
    let c = [b[0] + b[4], b[1] + b[5], b[2] + b[6], b[3] + b[7]];
    let d = [c[0] + c[2], c[1] + c[3]];
    d[0] + d[1]
}

/// Sum of `v` in 16 lanes and the same tree (the bias gradient).
fn lane_sum(v: &[f32]) -> f32 {
    let mut s = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for ch in &mut chunks {
        for j in 0..16 {
            s[j] += ch[j];
        }
    }
    for (j, &x) in chunks.remainder().iter().enumerate() {
        s[j] += x;
    }
    tree16(&s)
}

#[cfg(test)]
mod tests;
