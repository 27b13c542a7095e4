//! MAGVIT-v2 encode / decode throughput at 256 × 256 px (16 × 16 = 256 codes per image) with
//! the real `showlab/magvitv2` architecture and random weights, on the CPU backend (Flex).
//! One image per iteration; criterion reports images/s as elements/s. Peak resident memory
//! of the process (`VmHWM`) is printed at the end.

use std::hint::black_box;
use std::time::Duration;

use burn::tensor::{Distribution, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mmada_vq::{MagvitConfig, MagvitV2};

type B = burn::backend::Flex;

fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "VmHWM: n/a".into())
}

fn bench(c: &mut Criterion) {
    let device = Default::default();
    let model = MagvitV2::<B>::random(&MagvitConfig::real(), 0, &device).expect("real config");
    let side = 256;
    let pixels = Tensor::<B, 4>::random(
        [1, 3, side, side],
        Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let (codes, grid) = model.encode_with_grid(pixels.clone()).expect("encode");

    let mut g = c.benchmark_group("magvitv2_real_256px");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        b.iter(|| {
            let codes = model.encode(black_box(pixels.clone())).unwrap();
            black_box(codes.into_data())
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            let out = model.decode(black_box(codes.clone()), grid).unwrap();
            black_box(out.into_data())
        })
    });
    g.finish();
    eprintln!("peak memory after the benches: {}", peak_rss());
}

criterion_group!(benches, bench);
criterion_main!(benches);
