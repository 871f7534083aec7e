//! Criterion benches of the Rust kernels: `make bench-rust` (or `cargo bench --bench kernels`).
//! The figures beside torch and memcpy come from `make bench` (benches/bench_smaq.py).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use smaq_rs::bits::{get, BitWriter};
use smaq_rs::codec::{Param, Params};
use smaq_rs::dtype::{Data, DataMut};
use smaq_rs::format::Packed;
use smaq_rs::rng::SplitMix64;

fn normal(n: usize) -> Vec<f32> {
    let mut r = SplitMix64::new(7);
    (0..n)
        .map(|_| {
            // Irwin-Hall(4): close enough to a normal for SmaQ's outlier fraction.
            let s: f64 = (0..4)
                .map(|_| (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
                .sum();
            ((s - 2.0) * 3f64.sqrt()) as f32
        })
        .collect()
}

fn smaq(c: &mut Criterion) {
    let n = 1 << 22;
    let x = normal(n);
    let mut g = c.benchmark_group("smaq");
    g.throughput(Throughput::Bytes((n * 4) as u64));
    g.sample_size(20);
    for rounding in ["stochastic", "nearest"] {
        let mut p = Params::new();
        p.insert("rounding".into(), Param::Str(rounding.into()));
        g.bench_with_input(BenchmarkId::new("encode", rounding), &p, |b, p| {
            b.iter(|| Packed::encode(Data::F32(&x), &[n as u64], "smaq", p).unwrap())
        });
    }
    let packed = Packed::encode(Data::F32(&x), &[n as u64], "smaq", &Params::new()).unwrap();
    let mut out = vec![0f32; n];
    g.bench_function("decode", |b| {
        b.iter(|| packed.decode_into(DataMut::F32(&mut out)).unwrap())
    });
    g.finish();
}

fn bits(c: &mut Criterion) {
    let codes: Vec<u32> = (0..1u32 << 20)
        .map(|i| i.wrapping_mul(2654435761) & 63)
        .collect();
    let mut g = c.benchmark_group("bits");
    g.throughput(Throughput::Elements(codes.len() as u64));
    g.bench_function("put_6bit", |b| {
        b.iter(|| {
            let mut w = BitWriter::with_capacity_bits(codes.len() * 6);
            for &code in &codes {
                w.put(code, 6);
            }
            w.finish()
        })
    });
    let packed = smaq_rs::bits::pack(&codes, 6);
    g.bench_function("get_6bit", |b| {
        b.iter(|| {
            (0..codes.len())
                .map(|i| get(&packed, i * 6, 6))
                .fold(0u32, u32::wrapping_add)
        })
    });
    g.finish();
}

criterion_group!(benches, smaq, bits);
criterion_main!(benches);
