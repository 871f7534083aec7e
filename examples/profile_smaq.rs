//! Runs one stage of SmaQ on 64M normal floats, for `perf stat` (cycles per element are immune to
//! other load on the machine): `cargo run --release --example profile_smaq -- encode|decode|stats [k=v ...]`.
use smaq_rs::codec::{Param, Params};
use smaq_rs::dtype::{Data, DataMut};
use smaq_rs::format::Packed;
use smaq_rs::stats::{mean_std, Sampling, Spread};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stage = args
        .first()
        .map(String::as_str)
        .unwrap_or("all")
        .to_string();
    let mut p = Params::new();
    for kv in &args[1.min(args.len())..] {
        let (k, v) = kv.split_once('=').expect("k=v");
        let val = v
            .parse::<i64>()
            .map(Param::Int)
            .unwrap_or(Param::Str(v.to_string()));
        p.insert(k.to_string(), val);
    }
    let n = 1 << 26;
    let mut r = smaq_rs::rng::SplitMix64::new(1);
    let x: Vec<f32> = (0..n)
        .map(|_| {
            // Irwin-Hall(4) approximation of a normal: cheap to generate, same shape for SmaQ.
            let s: f64 = (0..4)
                .map(|_| (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
                .sum();
            ((s - 2.0) * 3f64.sqrt()) as f32
        })
        .collect();
    let packed = Packed::encode(Data::F32(&x), &[n as u64], "smaq", &p).unwrap();
    let mut out = vec![0f32; n];
    packed.decode_into(DataMut::F32(&mut out)).unwrap();
    let reps = 5;
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    for _ in 0..reps {
        match stage.as_str() {
            "stats" => {
                smaq_rs::pool::install(|| mean_std(&x, Sampling::Exact, Spread::Std));
            }
            "encode" => {
                Packed::encode(Data::F32(&x), &[n as u64], "smaq", &p).unwrap();
            }
            "decode" => packed.decode_into(DataMut::F32(&mut out)).unwrap(),
            _ => panic!("stage: stats | encode | decode"),
        }
    }
    let gb = (n * 4 * reps) as f64 / 1e9;
    let cpu = cpu_seconds() - cpu0;
    println!(
        "{stage}: {:.2} GB/s wall, {:.2} GB per CPU-second, {:.2} ns CPU per element",
        gb / t.elapsed().as_secs_f64(),
        gb / cpu,
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
