use super::*;
use crate::rng::SplitMix64;

fn levels() -> Vec<Level> {
    [Level::Portable, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|l| l.usable() == *l)
        .collect()
}

fn uniform(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

/// A random `rows x cols` weight with about `density` of its entries non-zero, some rows empty.
fn weight(rows: usize, cols: usize, density: f64, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..rows * cols)
        .map(|k| {
            let keep = (rng.next_u64() % 1000) as f64 / 1000.0 < density;
            let empty_row = rows > 2 && (k / cols) % 3 == 1 && seed.is_multiple_of(2);
            if keep && !empty_row {
                uniform(&mut rng)
            } else {
                0.0
            }
        })
        .collect()
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| uniform(&mut rng)).collect()
}

/// The three products in f64 from the dense weight, as plain sums.
fn reference(
    w: &[f32],
    rows: usize,
    cols: usize,
    x_t: &[f32],
    dy_t: &[f32],
    batch: usize,
    bias: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; rows * batch];
    let mut dx = vec![0f64; cols * batch];
    let mut dw = vec![0f64; rows * cols];
    for o in 0..rows {
        for t in 0..batch {
            y[o * batch + t] = bias[o] as f64;
        }
        for i in 0..cols {
            let wv = w[o * cols + i] as f64;
            for t in 0..batch {
                y[o * batch + t] += wv * x_t[i * batch + t] as f64;
                dx[i * batch + t] += wv * dy_t[o * batch + t] as f64;
                dw[o * cols + i] += dy_t[o * batch + t] as f64 * x_t[i * batch + t] as f64;
            }
        }
    }
    (y, dx, dw)
}

fn close(got: &[f32], want: &[f64], terms: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    // Each term is below 1 in magnitude: the float32 error of a sum of n terms is below
    // n * 2^-24 * (sum of |terms|) <= n^2 2^-24.
    let tol = (terms.max(1) as f64).powi(2) * 2f64.powi(-23) + 1e-6;
    for (k, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}[{k}]: {g} vs {w} (tolerance {tol})"
        );
    }
}

/// A value that marks the padding columns `batch..ld`: never read (it would turn a result into
/// NaN) and never written (it must still be there).
const CANARY: u32 = 0x7fc0_1234;

/// `m` (rows x batch) with rows `ld` apart and the gap filled with the canary.
fn padded(m: &[f32], rows: usize, batch: usize, ld: usize) -> Vec<f32> {
    let mut out = vec![f32::from_bits(CANARY); rows * ld];
    for r in 0..rows {
        out[r * ld..r * ld + batch].copy_from_slice(&m[r * batch..(r + 1) * batch]);
    }
    out
}

/// The `rows x batch` part of a padded result, after checking that the padding is untouched.
fn unpad(m: &[f32], rows: usize, batch: usize, ld: usize, what: &str) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * batch);
    for r in 0..rows {
        out.extend_from_slice(&m[r * ld..r * ld + batch]);
        assert!(
            m[r * ld + batch..(r + 1) * ld]
                .iter()
                .all(|v| v.to_bits() == CANARY),
            "{what}: padding of row {r} was written"
        );
    }
    out
}

/// y, dx, dw, db of one level.
type Products = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn run(rows: usize, cols: usize, batch: usize, density: f64, seed: u64) {
    run_ld(rows, cols, batch, batch, density, seed);
    let ld = padded_ld(batch);
    if ld != batch {
        run_ld(rows, cols, batch, ld, density, seed);
    }
}

fn run_ld(rows: usize, cols: usize, batch: usize, ld: usize, density: f64, seed: u64) {
    let w = weight(rows, cols, density, seed);
    let (csr, vals) = Csr::from_dense(rows, cols, &w).unwrap();
    assert_eq!(csr.to_dense(&vals).unwrap(), w);
    let x_t = data(cols * batch, seed + 1);
    let dy_t = data(rows * batch, seed + 2);
    let bias = data(rows, seed + 3);
    let (ry, rdx, rdw) = reference(&w, rows, cols, &x_t, &dy_t, batch, &bias);
    let (x_p, dy_p) = (
        padded(&x_t, cols, batch, ld),
        padded(&dy_t, rows, batch, ld),
    );
    let mut first: Option<Products> = None;
    for level in levels() {
        let mut y = vec![f32::from_bits(CANARY); rows * ld];
        forward(&csr, &vals, &x_p, batch, ld, Some(&bias), &mut y, level).unwrap();
        let mut dx = vec![f32::from_bits(CANARY); cols * ld];
        let mut dw = vec![f32::NAN; csr.nnz()];
        let mut db = vec![f32::NAN; rows];
        backward(
            &csr,
            &vals,
            &x_p,
            &dy_p,
            batch,
            ld,
            Some(&mut dx),
            Some(&mut dw),
            Some(&mut db),
            false,
            level,
        )
        .unwrap();
        // The same dw from the batch in chunks of 128 columns, accumulated.
        if batch > DOT_TILE && ld == batch {
            let mut dw_acc = vec![f32::NAN; csr.nnz()];
            for (i, t0) in (0..batch).step_by(DOT_TILE).enumerate() {
                let w = DOT_TILE.min(batch - t0);
                let part = |m: &[f32], r: usize| -> Vec<f32> {
                    (0..r)
                        .flat_map(|k| m[k * batch + t0..k * batch + t0 + w].to_vec())
                        .collect()
                };
                let (xc, dyc) = (part(&x_p, cols), part(&dy_p, rows));
                backward(
                    &csr,
                    &vals,
                    &xc,
                    &dyc,
                    w,
                    w,
                    None,
                    Some(&mut dw_acc),
                    None,
                    i > 0,
                    level,
                )
                .unwrap();
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&dw_acc),
                bits(&dw),
                "chunked dw {rows}x{cols} batch {batch}"
            );
        }
        let tag = format!("{rows}x{cols} batch {batch} ld {ld} density {density} {level:?}");
        let y = unpad(&y, rows, batch, ld, &tag);
        let dx = unpad(&dx, cols, batch, ld, &tag);
        close(&y, &ry, cols + 1, &format!("y {tag}"));
        close(&dx, &rdx, rows, &format!("dx {tag}"));
        let rdw_nz: Vec<f64> = (0..rows)
            .flat_map(|o| {
                let (a, b) = (csr.row_ptr()[o], csr.row_ptr()[o + 1]);
                let rdw = &rdw;
                let csr = &csr;
                (a..b).map(move |k| rdw[o * cols + csr.col_idx().get(k)])
            })
            .collect();
        close(&dw, &rdw_nz, batch, &format!("dw {tag}"));
        let rdb: Vec<f64> = (0..rows)
            .map(|o| {
                dy_t[o * batch..(o + 1) * batch]
                    .iter()
                    .map(|&v| v as f64)
                    .sum()
            })
            .collect();
        close(&db, &rdb, batch, &format!("db {tag}"));
        // Every level gives the bits of the portable code.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        match &first {
            None => first = Some((y, dx, dw, db)),
            Some((y0, dx0, dw0, db0)) => {
                assert_eq!(bits(&y), bits(y0), "y bits {tag}");
                assert_eq!(bits(&dx), bits(dx0), "dx bits {tag}");
                assert_eq!(bits(&dw), bits(dw0), "dw bits {tag}");
                assert_eq!(bits(&db), bits(db0), "db bits {tag}");
            }
        }
    }
}

#[test]
fn products_match_the_dense_reference_at_every_level() {
    let mut seed = 10;
    for &(rows, cols) in &[(1, 1), (7, 5), (33, 70), (64, 48), (3, 200)] {
        for &batch in &[1usize, 5, 16, 17, 63, 64, 129, 300] {
            for &density in &[0.0, 0.05, 0.3, 1.0] {
                run(rows, cols, batch, density, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn no_rows_no_batch_and_wide_indices() {
    run(0, 9, 4, 0.5, 1);
    run(9, 0, 4, 0.5, 2);
    run(5, 6, 0, 0.5, 3);
    // More than 65536 columns: 4-byte column indices.
    let (rows, cols, batch) = (2, 70_000, 3);
    let mut w = vec![0f32; rows * cols];
    w[69_999] = 2.0;
    w[cols + 3] = -1.0;
    w[cols + 66_000] = 0.5;
    let (csr, vals) = Csr::from_dense(rows, cols, &w).unwrap();
    assert_eq!(csr.col_idx().width(), 4);
    let x_t = data(cols * batch, 4);
    for level in levels() {
        let mut y = vec![0f32; rows * batch];
        forward(&csr, &vals, &x_t, batch, batch, None, &mut y, level).unwrap();
        for t in 0..batch {
            assert_eq!(y[t], 2.0 * x_t[69_999 * batch + t]);
            let want = (-1.0f32).mul_add(x_t[3 * batch + t], 0.0);
            assert_eq!(y[batch + t], 0.5f32.mul_add(x_t[66_000 * batch + t], want));
        }
    }
    let (small, _) = Csr::from_dense(2, 3, &[1.0, 0.0, 2.0, 0.0, 0.0, 3.0]).unwrap();
    assert_eq!(small.col_idx().width(), 2);
    assert_eq!(small.index_nbytes(), 6);
}

#[test]
fn shape_mismatches_are_layout_errors() {
    let (csr, vals) = Csr::from_dense(2, 3, &[1.0, 0.0, 2.0, 0.0, 0.0, 3.0]).unwrap();
    let x_t = vec![1f32; 3 * 4];
    let mut y = vec![0f32; 2 * 4];
    let lv = Level::best();
    let err = |r: Result<()>| match r {
        Err(Error::Layout(m)) => m,
        other => panic!("expected a layout error, got {other:?}"),
    };
    let m = err(forward(&csr, &vals, &x_t, 5, 4, None, &mut y, lv));
    assert!(
        m.contains("row stride 4 is smaller than the batch 5"),
        "{m}"
    );
    let m = err(forward(&csr, &vals[..2], &x_t, 4, 4, None, &mut y, lv));
    assert!(
        m.contains("values have 2 elements") && m.contains("3 non-zeros"),
        "{m}"
    );
    let m = err(forward(&csr, &vals, &x_t[..11], 4, 4, None, &mut y, lv));
    assert!(m.contains("11 elements") && m.contains("3 x 4 = 12"), "{m}");
    assert_eq!(
        (padded_ld(2048), padded_ld(100), padded_ld(0)),
        (2064, 112, 0)
    );
    let m = err(forward(&csr, &vals, &x_t, 4, 4, Some(&[0.0]), &mut y, lv));
    assert!(m.contains("bias has 1 elements"), "{m}");
    let m = err(forward(&csr, &vals, &x_t, 4, 4, None, &mut y[..7], lv));
    assert!(m.contains("output"), "{m}");
    let dy = vec![1f32; 8];
    let mut dw = vec![0f32; 4];
    let m = err(backward(
        &csr,
        &vals,
        &x_t,
        &dy,
        4,
        4,
        None,
        Some(&mut dw),
        None,
        false,
        lv,
    ));
    assert!(m.contains("weight gradient has 4 elements"), "{m}");
    let mut dx = vec![0f32; 5];
    let m = err(backward(
        &csr,
        &vals,
        &x_t,
        &dy,
        4,
        4,
        Some(&mut dx),
        None,
        None,
        false,
        lv,
    ));
    assert!(m.contains("input gradient"), "{m}");
    let m = err(backward(
        &csr,
        &vals,
        &x_t,
        &dy[..6],
        4,
        4,
        None,
        None,
        None,
        false,
        lv,
    ));
    assert!(m.contains("output gradient"), "{m}");
    // Malformed patterns.
    let bad = |p: &[i64], c: &[i64]| match Csr::new(2, 3, p, c) {
        Err(Error::Layout(m)) => m,
        other => panic!("expected a layout error, got {other:?}"),
    };
    assert!(bad(&[0, 1], &[0]).contains("rows + 1 = 3"));
    assert!(bad(&[1, 1, 1], &[0]).contains("start at 0"));
    assert!(bad(&[0, 1, 2], &[0, 3]).contains("index 3"));
    assert!(bad(&[0, 1, 2], &[0, -1]).contains("index -1"));
    assert!(bad(&[0, 2, 2], &[2, 1]).contains("strictly increasing"));
    assert!(bad(&[0, 2, 1], &[0, 1]).contains("non-decreasing"));
    assert!(bad(&[0, 1, 1], &[0, 1]).contains("last row pointer"));
    assert!(bad(&[0, 1, 9], &[0, 1]).contains("at most 2"));
}

#[test]
fn transpose_moves_every_entry_and_nothing_else() {
    for &(rows, cols) in &[
        (0usize, 3usize),
        (3, 0),
        (1, 1),
        (5, 7),
        (17, 33),
        (100, 40),
    ] {
        for &(pad_s, pad_d) in &[(0usize, 0usize), (3, 16)] {
            let (sld, dld) = (cols + pad_s, rows + pad_d);
            let src = data(rows * sld, 9);
            let mut dst = vec![f32::from_bits(CANARY); cols * dld];
            transpose(&src, rows, cols, sld, &mut dst, dld).unwrap();
            for c in 0..cols {
                for r in 0..dld {
                    let want = if r < rows {
                        src[r * sld + c].to_bits()
                    } else {
                        CANARY
                    };
                    assert_eq!(dst[c * dld + r].to_bits(), want, "{rows}x{cols} ({r}, {c})");
                }
            }
        }
    }
    let mut d = vec![0f32; 6];
    assert!(matches!(
        transpose(&[0.0; 6], 2, 3, 3, &mut d, 1),
        Err(Error::Layout(_))
    ));
    assert!(matches!(
        transpose(&[0.0; 5], 2, 3, 3, &mut d, 2),
        Err(Error::Layout(_))
    ));
}
