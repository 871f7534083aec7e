//! Encodes (then decodes) 16M normal floats with one codec in a loop and prints CPU time per
//! element (user + system from /proc, so it is meaningful on a loaded machine), for `perf record`
//! too:
//! `cargo run --release --example profile_codecs -- <codec> [reps] [k=v ...]`, e.g.
//! `profile_codecs fp16`, `profile_codecs int 20 scheme=absmax block_size=4096`. The element count
//! is `PROFILE_N` (default 16M).
use smaq_rs::codec::{Param, Params};
use smaq_rs::dtype::{Data, DataMut};
use smaq_rs::format::Packed;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let codec = args.first().cloned().unwrap_or_else(|| "fp16".into());
    let reps: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(10);
    let mut p = Params::new();
    for kv in args.iter().skip(2) {
        let (k, v) = kv.split_once('=').expect("k=v");
        let val = v
            .parse::<i64>()
            .map(Param::Int)
            .unwrap_or(Param::Str(v.to_string()));
        p.insert(k.to_string(), val);
    }
    let n: usize = std::env::var("PROFILE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 24);
    let mut r = smaq_rs::rng::SplitMix64::new(1);
    let x: Vec<f32> = (0..n)
        .map(|_| {
            let s: f64 = (0..4)
                .map(|_| (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
                .sum();
            ((s - 2.0) * 3f64.sqrt()) as f32
        })
        .collect();
    let shape = [n as u64];
    drop(Packed::encode(Data::F32(&x), &shape, &codec, &p).unwrap());
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t1 = Instant::now();
        let pk = Packed::encode(Data::F32(&x), &shape, &codec, &p).unwrap();
        best = best.min(t1.elapsed().as_secs_f64());
        drop(pk);
    }
    let cpu = cpu_seconds() - cpu0;
    let gb = (n * 4) as f64 / 1e9;
    println!(
        "{codec} encode: best {:.2} GB/s wall, mean {:.2} GB/s wall, {:.3} ns CPU per element",
        gb / best,
        gb * reps as f64 / t.elapsed().as_secs_f64(),
        cpu * 1e9 / (n * reps) as f64
    );
    let packed = Packed::encode(Data::F32(&x), &shape, &codec, &p).unwrap();
    let mut out = vec![0f32; n];
    let cpu0 = cpu_seconds();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t1 = Instant::now();
        packed.decode_into(DataMut::F32(&mut out)).unwrap();
        best = best.min(t1.elapsed().as_secs_f64());
    }
    let cpu = cpu_seconds() - cpu0;
    println!(
        "{codec} decode: best {:.2} GB/s wall, {:.3} ns CPU per element",
        gb / best,
        cpu * 1e9 / (n * reps) as f64
    );
}

/// User + system CPU time of this process, from /proc (Linux), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}
