//! GPU kernel benchmarks (criterion): flash attention forward and backward (causal, hd 128,
//! 16 heads, 16k tokens per call, T = 1k..8k), the grouped expert GEMMs of an MoE FFN (8 experts
//! x 2048 tokens, H 2048, I 5632: forward, and forward + backward) and one decode step of the
//! whole model (moe_medium). Prints SKIP and measures nothing without a GPU.
//!
//! Run on a GPU machine: `cargo bench --bench gpu` (or `-- flash` to filter). Throughput is in
//! FLOP/s (`Throughput::Elements` counts floating-point operations, so criterion's "elem/s"
//! reads as FLOP/s). Each sample times `iters` launches between two device synchronisations.
//! `flexrun bench attention|moe|decode --device cuda` print the same figures next to PyTorch's
//! (tools/gpu-bench.sh).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flexrun::backend::cuda::{flash, Buf, Device};
use flexrun::model::net::GpuNet;
use flexrun::model::{Config, Model};
use flexrun::ops::AttnShape;
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

fn device() -> Option<Device> {
    match Device::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIP: no CUDA device ({e})");
            None
        }
    }
}

fn random(dev: &Device, n: usize, rng: &mut StdRng) -> Buf<bf16> {
    let v: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
        .collect();
    dev.upload(&v).expect("upload")
}

/// Time `iters` calls of `f` between two synchronisations.
fn timed(dev: &Device, iters: u64, mut f: impl FnMut()) -> Duration {
    dev.synchronize().expect("synchronize");
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().expect("synchronize");
    t0.elapsed()
}

fn flash_attention(c: &mut Criterion) {
    let Some(dev) = device() else { return };
    let mut rng = StdRng::seed_from_u64(0);
    let mut g = c.benchmark_group("flash_attention");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    for t in [1024usize, 4096, 8192] {
        let s = AttnShape::causal(16384 / t, t, 16, 16, 128);
        let n = s.b * t * 16 * 128;
        let (q, k, v, dout) = (
            random(&dev, n, &mut rng),
            random(&dev, n, &mut rng),
            random(&dev, n, &mut rng),
            random(&dev, n, &mut rng),
        );
        let mut out = dev.alloc::<bf16>(n).unwrap();
        let mut lse = dev.alloc::<f32>(s.b * 16 * t).unwrap();
        let (mut dq, mut dk, mut dv) = (
            dev.alloc::<bf16>(n).unwrap(),
            dev.alloc::<bf16>(n).unwrap(),
            dev.alloc::<bf16>(n).unwrap(),
        );
        let flops = flash::causal_attention_flops(&s);
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(BenchmarkId::new("forward", t), |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    dev.flash_attention_fwd(&q, &k, &v, s, &mut out, &mut lse)
                        .unwrap()
                })
            })
        });
        g.throughput(Throughput::Elements((2.5 * flops) as u64));
        g.bench_function(BenchmarkId::new("backward", t), |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    dev.flash_attention_bwd(
                        &q, &k, &v, &out, &lse, &dout, s, &mut dq, &mut dk, &mut dv,
                    )
                    .unwrap()
                })
            })
        });
    }
    g.finish();
}

/// The operands of one grouped expert FFN (`e` experts of `per` tokens, hidden `h`, intermediate
/// `i`), its activations and gradients.
struct GroupedFfn {
    e: usize,
    h: usize,
    i: usize,
    offsets: Buf<u32>,
    x: Buf<bf16>,
    dy: Buf<bf16>,
    wg: Buf<bf16>,
    wu: Buf<bf16>,
    wd: Buf<bf16>,
    act: Buf<bf16>,
    gate: Buf<bf16>,
    up: Buf<bf16>,
    y: Buf<bf16>,
    dgate: Buf<bf16>,
    dup: Buf<bf16>,
    dx: Buf<bf16>,
    dwg: Buf<f32>,
    dwu: Buf<f32>,
    dwd: Buf<f32>,
}

impl GroupedFfn {
    fn new(dev: &Device, e: usize, per: usize, h: usize, i: usize) -> Self {
        let m = e * per;
        let mut rng = StdRng::seed_from_u64(1);
        let offsets: Vec<u32> = (0..=e).map(|j| (j * per) as u32).collect();
        let mut r = |n: usize| random(dev, n, &mut rng);
        let (x, dy, wg, wu, wd) = (r(m * h), r(m * h), r(e * i * h), r(e * i * h), r(e * h * i));
        let b16 = |n: usize| dev.alloc::<bf16>(n).unwrap();
        let f32s = |n: usize| dev.alloc::<f32>(n).unwrap();
        GroupedFfn {
            e,
            h,
            i,
            offsets: dev.upload(&offsets).unwrap(),
            x,
            dy,
            wg,
            wu,
            wd,
            act: b16(m * i),
            gate: b16(m * i),
            up: b16(m * i),
            y: b16(m * h),
            dgate: b16(m * i),
            dup: b16(m * i),
            dx: b16(m * h),
            dwg: f32s(e * i * h),
            dwu: f32s(e * i * h),
            dwd: f32s(e * h * i),
        }
    }

    /// Gate/up + SwiGLU, then down (keeping the pre-activations with `saved`).
    fn forward(&mut self, dev: &Device, saved: bool) {
        let (e, h, i) = (self.e, self.h, self.i);
        let pre = saved.then(|| (self.gate.view_mut(..), self.up.view_mut(..)));
        dev.grouped_gateup_fwd(
            &self.x,
            &self.offsets,
            &self.wg,
            &self.wu,
            e,
            h,
            i,
            &mut self.act,
            pre,
        )
        .unwrap();
        dev.grouped_nt(&self.act, &self.offsets, &self.wd, e, i, h, &mut self.y)
            .unwrap();
    }

    /// Input and weight gradients from `dy`.
    fn backward(&mut self, dev: &Device) {
        let (e, h, i) = (self.e, self.h, self.i);
        let o = &self.offsets;
        dev.grouped_nn_swiglu_bwd(
            &self.dy,
            o,
            &self.wd,
            &self.gate,
            &self.up,
            e,
            h,
            i,
            &mut self.dgate,
            &mut self.dup,
        )
        .unwrap();
        dev.grouped_wgrad(
            &self.dy,
            &self.act,
            o,
            None,
            None,
            e,
            h,
            i,
            false,
            &mut self.dwd,
        )
        .unwrap();
        dev.grouped_nn(
            &self.dgate,
            o,
            &self.wg,
            Some((self.dup.as_view(), self.wu.as_view())),
            e,
            i,
            h,
            &mut self.dx,
        )
        .unwrap();
        dev.grouped_wgrad(
            &self.dgate,
            &self.x,
            o,
            None,
            Some((self.dup.as_view(), self.dwu.view_mut(..))),
            e,
            i,
            h,
            false,
            &mut self.dwg,
        )
        .unwrap();
    }
}

fn grouped_ffn(c: &mut Criterion) {
    let Some(dev) = device() else { return };
    let (e, per, h, i) = (8usize, 2048usize, 2048usize, 5632usize);
    let mut ffn = GroupedFfn::new(&dev, e, per, h, i);
    let mhi = (e * per * h * i) as f64;
    let mut g = c.benchmark_group("grouped_ffn");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements((6.0 * mhi) as u64));
    g.bench_function("forward", |b| {
        b.iter_custom(|iters| timed(&dev, iters, || ffn.forward(&dev, false)))
    });
    g.throughput(Throughput::Elements((18.0 * mhi) as u64));
    g.bench_function("forward_backward", |b| {
        b.iter_custom(|iters| {
            timed(&dev, iters, || {
                ffn.forward(&dev, true);
                ffn.backward(&dev);
            })
        })
    });
    g.finish();
}

fn decode_step(c: &mut Criterion) {
    let Some(dev) = device() else { return };
    // From the repository root (where the GPU machine runs it), else where it was built.
    let rel = Path::new("benches/configs/moe_medium.json");
    let path = if rel.exists() {
        rel.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    };
    let cfg = Config::load(&path).expect("benches/configs/moe_medium.json");
    let model = GpuNet::upload(&dev, &Model::new_random(&cfg, 0).unwrap()).unwrap();
    let mut g = c.benchmark_group("decode");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    for batch in [1usize, 16] {
        // A 128-token prompt in the cache, then one new token per sequence per step (the cache
        // is refilled when it runs out, outside the timed loop's typical iteration).
        let prompt: Vec<u32> = (0..batch * 128).map(|j| (j % 1000) as u32).collect();
        let capacity = 4096;
        let mut cache = model.new_cache(batch, capacity).unwrap();
        model
            .forward(&prompt, batch, 128, Some(&mut cache))
            .unwrap();
        let next = vec![7u32; batch];
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new("moe_medium_step", batch), |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    if cache.len + 1 > capacity {
                        cache.len = 128;
                    }
                    model.forward(&next, batch, 1, Some(&mut cache)).unwrap();
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, flash_attention, grouped_ffn, decode_step);
criterion_main!(benches);
