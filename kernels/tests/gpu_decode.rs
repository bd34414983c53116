//! GPU checks of the decode kernels (`decode.cu`) against CPU references written here, on
//! random inputs (ignored without a GPU; `scripts/gpu-kernels.sh` runs them with `--ignored`).
//!
//! Tolerances: attention reads bf16 keys and values (the references read the same bf16
//! values) and sums in another order with the CUDA library's `expf`: outputs agree to 2e-5
//! relative to the largest |value|. The greedy pick is exact (first index of the maximum).

use half::bf16;
use kiln_kernels::cuda::decode::{AttentionShape, ARGMAX_BLOCKS};
use kiln_kernels::cuda::CudaKernels;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> CudaKernels {
    CudaKernels::new(0).unwrap_or_else(|e| panic!("GPU test run where CUDA is not usable: {e}"))
}

/// `n` values uniform in (-lim, lim), as bf16.
fn bf16s(r: &mut ChaCha8Rng, n: usize, lim: f32) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(r.random_range(-lim..lim)))
        .collect()
}

/// Attention of `tokens` queries at positions pos..pos+T over a bf16 cache, on the CPU (f64).
#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f32],
    kc: &[bf16],
    vc: &[bf16],
    pos: usize,
    tokens: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
    cap: usize,
) -> Vec<f32> {
    let rep = nh / kvh;
    let mut out = vec![0f32; tokens * nh * hd];
    for t in 0..tokens {
        let len = pos + t + 1;
        for h in 0..nh {
            let g = h / rep;
            let qv = &q[(t * nh + h) * hd..(t * nh + h + 1) * hd];
            let scores: Vec<f64> = (0..len)
                .map(|j| {
                    let kr = &kc[(g * cap + j) * hd..(g * cap + j + 1) * hd];
                    qv.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * b.to_f64())
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = w.iter().sum();
            for e in 0..hd {
                let o: f64 = (0..len)
                    .map(|j| w[j] * vc[(g * cap + j) * hd + e].to_f64())
                    .sum();
                out[(t * nh + h) * hd + e] = (o / sum) as f32;
            }
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn split_attention_matches_the_cpu_reference() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(7);
    // (heads, kv heads, head_dim, capacity, pos, tokens, chunk)
    for &(nh, kvh, hd, cap, pos, tokens, chunk) in &[
        (
            14usize, 2usize, 64usize, 700usize, 650usize, 1usize, 32usize,
        ),
        (28, 4, 128, 300, 17, 1, 64),
        (4, 2, 32, 100, 0, 1, 32),
        (16, 8, 128, 400, 200, 5, 32),
        (14, 2, 64, 90, 10, 8, 96),
    ] {
        let splits = cap.div_ceil(chunk);
        let q: Vec<f32> = (0..tokens * nh * hd)
            .map(|_| r.random_range(-2.0..2.0))
            .collect();
        let kc = bf16s(&mut r, kvh * cap * hd, 2.0);
        let vc = bf16s(&mut r, kvh * cap * hd, 1.0);
        let qd = s.clone_htod(&q).unwrap();
        let kd = s.clone_htod(&kc).unwrap();
        let vd = s.clone_htod(&vc).unwrap();
        let posd = s.clone_htod(&[pos as i32]).unwrap();
        let po = s.alloc_zeros::<f32>(tokens * nh * splits * hd).unwrap();
        let pml = s.alloc_zeros::<f32>(tokens * nh * splits * 2).unwrap();
        let out = s.alloc_zeros::<f32>(tokens * nh * hd).unwrap();
        let shape = AttentionShape {
            tokens,
            heads: nh,
            kv_heads: kvh,
            head_dim: hd,
            capacity: cap,
            chunk,
            splits,
        };
        // SAFETY: every buffer is sized as the launcher's contract says.
        unsafe {
            k.attention_async(
                k.addr(&qd, 0),
                k.addr(&kd, 0),
                k.addr(&vd, 0),
                k.addr(&posd, 0),
                k.addr(&po, 0),
                k.addr(&pml, 0),
                Some(k.addr(&out, 0)),
                &shape,
            )
            .unwrap();
        }
        let mut got = vec![0f32; tokens * nh * hd];
        s.memcpy_dtoh(&out, &mut got).unwrap();
        let want = attention_ref(&q, &kc, &vc, pos, tokens, nh, kvh, hd, cap);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!(
            "attention nh={nh} kvh={kvh} hd={hd} pos={pos} T={tokens} splits={splits}: max |Δ| {diff:.2e} (scale {scale:.3})"
        );
        assert!(diff <= 2e-5 * scale.max(1.0), "max |Δ| {diff}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_greedy_pick_takes_the_first_maximum_and_advances_the_position() {
    let k = gpu();
    let s = k.stream().clone();
    for &(v, best, tie) in &[
        (151_936usize, 151_935usize, false),
        (1000, 3, true),
        (40, 0, false),
    ] {
        let mut logits: Vec<f32> = (0..v).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
        logits[best] = 5.0;
        if tie {
            logits[v - 1] = 5.0; // a later equal maximum must not win
        }
        let ld = s.clone_htod(&logits).unwrap();
        let pv = s.alloc_zeros::<f32>(ARGMAX_BLOCKS).unwrap();
        let pi = s.alloc_zeros::<i32>(ARGMAX_BLOCKS).unwrap();
        let counter = s.alloc_zeros::<u32>(1).unwrap();
        let token = s.alloc_zeros::<u32>(1).unwrap();
        let pos = s.clone_htod(&[41i32]).unwrap();
        for _ in 0..3 {
            // SAFETY: buffers sized as the contract says; the counter starts at zero
            unsafe {
                k.argmax_advance_async(
                    k.addr(&ld, 0),
                    v,
                    k.addr(&pv, 0),
                    k.addr(&pi, 0),
                    k.addr(&counter, 0),
                    k.addr(&token, 0),
                    k.addr(&pos, 0),
                    true,
                )
                .unwrap();
            }
        }
        let (mut t, mut p, mut c) = ([0u32], [0i32], [1u32]);
        s.memcpy_dtoh(&token, &mut t).unwrap();
        s.memcpy_dtoh(&pos, &mut p).unwrap();
        s.memcpy_dtoh(&counter, &mut c).unwrap();
        assert_eq!(t[0] as usize, best, "vocab {v}");
        assert_eq!(p[0], 44, "three picks advance the position by three");
        assert_eq!(c[0], 0, "the counter is left at zero for the next launch");
    }
}

/// Frequencies of `n` sampled picks over `logits` with `p`.
fn sample_freqs(
    k: &CudaKernels,
    logits: &[f32],
    p: &kiln_kernels::cuda::decode::DeviceSampling,
    n: usize,
) -> Vec<f64> {
    let s = k.stream().clone();
    let ld = s.clone_htod(logits).unwrap();
    let step = s.alloc_zeros::<u32>(1).unwrap();
    let token = s.alloc_zeros::<u32>(1).unwrap();
    let pos = s.alloc_zeros::<i32>(1).unwrap();
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        // SAFETY: buffers sized as the launcher's contract says
        unsafe {
            k.sample_advance_async(
                k.addr(&ld, 0),
                logits.len(),
                p,
                k.addr(&step, 0),
                k.addr(&token, 0),
                k.addr(&pos, 0),
                false,
            )
            .unwrap();
        }
        let mut t = [0u32];
        s.memcpy_dtoh(&token, &mut t).unwrap();
        counts[t[0] as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / n as f64).collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_gpu_sampler_follows_temperature_top_k_and_top_p() {
    use kiln_kernels::cuda::decode::DeviceSampling;
    let k = gpu();
    // five likely tokens (0.5, 0.3, 0.1, 0.07, 0.03) among 50,000 impossible ones
    let probs = [0.5f64, 0.3, 0.1, 0.07, 0.03];
    let mut logits = vec![-1e4f32; 50_000];
    for (i, p) in probs.iter().enumerate() {
        logits[i * 9973] = p.ln() as f32;
    }
    let at = |f: &[f64], i: usize| f[i * 9973];
    let n = 4000;
    let sp = |t: f32, top_k: usize, top_p: f32| DeviceSampling {
        temperature: t,
        top_k,
        top_p,
        seed: 5,
    };
    // plain: the distribution itself (4000 draws: ±0.03 is > 3 standard deviations)
    let f = sample_freqs(&k, &logits, &sp(1.0, 0, 1.0), n);
    for (i, p) in probs.iter().enumerate() {
        assert!(
            (at(&f, i) - p).abs() < 0.03,
            "token {i}: {} vs {p}",
            at(&f, i)
        );
    }
    // temperature 0.5: p² renormalised
    let z: f64 = probs.iter().map(|p| p * p).sum();
    let f = sample_freqs(&k, &logits, &sp(0.5, 0, 1.0), n);
    for (i, p) in probs.iter().enumerate() {
        assert!((at(&f, i) - p * p / z).abs() < 0.03, "T=0.5 token {i}");
    }
    // top-k 2: tokens 0 and 1 only, 5 : 3
    let f = sample_freqs(&k, &logits, &sp(1.0, 2, 1.0), n);
    assert!((at(&f, 0) + at(&f, 1) - 1.0).abs() < 1e-9);
    assert!((at(&f, 0) - 0.625).abs() < 0.03, "top-k 2: {}", at(&f, 0));
    // top-p 0.75: the prefix reaching 0.75 is {0, 1}; top-p 0.45: {0} alone
    let f = sample_freqs(&k, &logits, &sp(1.0, 0, 0.75), n);
    assert!((at(&f, 0) + at(&f, 1) - 1.0).abs() < 1e-9);
    let f = sample_freqs(&k, &logits, &sp(1.0, 0, 0.45), 200);
    assert_eq!(at(&f, 0), 1.0);
    // seeded: the same seed and steps give the same tokens
    let a = sample_freqs(&k, &logits, &sp(1.0, 0, 1.0), 300);
    let b = sample_freqs(&k, &logits, &sp(1.0, 0, 1.0), 300);
    assert_eq!(a, b);
}

/// The flash prefill attention (scores in registers, online softmax over tiles of 64 keys)
/// against the f64 reference, over head dims 32/64/128, GQA ratios 2..7, batches that are and
/// are not multiples of the 64-row block, and batches that start after earlier positions.
/// Tolerance: the kernel rounds the probabilities to bf16 (8 significant bits) before P·V, as
/// the GEMM path it replaces did, so outputs (|V| ≤ 1) differ by up to ~1e-2 from the exact
/// softmax; 2e-2 is allowed.
#[test]
#[ignore = "needs a CUDA GPU"]
fn flash_prefill_attention_matches_the_cpu_reference() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(11);
    // (heads, kv heads, head_dim, capacity, pos, tokens)
    for &(nh, kvh, hd, cap, pos, tokens) in &[
        (14usize, 2usize, 64usize, 700usize, 0usize, 200usize),
        (28, 4, 128, 400, 37, 300),
        (16, 8, 128, 300, 0, 129),
        (4, 2, 32, 200, 5, 70),
        (32, 8, 128, 1100, 1000, 65),
        (14, 2, 64, 64, 0, 9),
    ] {
        let q = bf16s(&mut r, tokens * nh * hd, 2.0);
        let kc = bf16s(&mut r, kvh * cap * hd, 2.0);
        let vc = bf16s(&mut r, kvh * cap * hd, 1.0);
        let qd = s.clone_htod(&q).unwrap();
        let kd = s.clone_htod(&kc).unwrap();
        let vd = s.clone_htod(&vc).unwrap();
        let posd = s.clone_htod(&[pos as i32]).unwrap();
        let out = s.alloc_zeros::<f32>(tokens * nh * hd).unwrap();
        // SAFETY: every buffer is sized as the launcher's contract says.
        let queued = unsafe {
            k.flash_prefill_async(
                k.addr(&qd, 0),
                k.addr(&kd, 0),
                k.addr(&vd, 0),
                k.addr(&posd, 0),
                k.addr(&out, 0),
                tokens,
                (nh, kvh, hd),
                cap,
            )
            .unwrap()
        };
        assert!(queued, "head_dim {hd} has a flash kernel");
        let mut got = vec![0f32; tokens * nh * hd];
        s.memcpy_dtoh(&out, &mut got).unwrap();
        let qf: Vec<f32> = q.iter().map(|x| x.to_f32()).collect();
        let want = attention_ref(&qf, &kc, &vc, pos, tokens, nh, kvh, hd, cap);
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let nan = got.iter().any(|x| !x.is_finite());
        eprintln!(
            "flash prefill nh={nh} kvh={kvh} hd={hd} pos={pos} T={tokens}: max |Δ| {diff:.2e}"
        );
        assert!(!nan && diff <= 2e-2, "max |Δ| {diff}, non-finite {nan}");
    }
    // a head dim without a kernel queues nothing
    let none = unsafe { k.flash_prefill_async(0, 0, 0, 0, 0, 16, (4, 2, 256), 64) }.unwrap();
    assert!(!none);
}

/// Each bf16 element within one bf16 ulp of the f64 value (plus `abs` near zero).
fn assert_within_a_bf16_ulp(what: &str, got: &[bf16], want: &[f64], abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let tol = w.abs() / 128.0 + abs;
        let d = (g.to_f64() - w).abs();
        assert!(d <= tol, "{what}[{i}]: got {g}, want {w} (|Δ| {d:.3e})");
    }
}

/// The prompt path's float4 add + RMSNorm (rows > 8, bf16 out) and eight-a-thread SwiGLU
/// against f64 references: within a bf16 ulp of each output, the residual add written back in
/// f32 exactly; also with the first layer's null residual and at the widest row it takes.
#[test]
#[ignore = "needs a CUDA GPU"]
fn prompt_norm_and_swiglu_match_the_reference() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(21);
    let eps = 1e-6f32;
    for (rows, width, with_resid) in [(33, 896, true), (17, 3584, false), (9, 8192, true)] {
        let x: Vec<f32> = (0..rows * width)
            .map(|_| r.random_range(-2.0..2.0))
            .collect();
        let d: Vec<f32> = (0..rows * width)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        let w: Vec<f32> = (0..width).map(|_| r.random_range(0.5..1.5)).collect();
        let xd = s.clone_htod(&x).unwrap();
        let dd = s.clone_htod(&d).unwrap();
        let wd = s.clone_htod(&w).unwrap();
        let hd = s.alloc_zeros::<bf16>(rows * width).unwrap();
        let resid = if with_resid { k.addr(&dd, 0) } else { 0 };
        // SAFETY: x, d hold rows·width f32, w width f32, h rows·width bf16.
        unsafe {
            k.add_rmsnorm_async(
                k.addr(&xd, 0),
                resid,
                k.addr(&wd, 0),
                k.addr(&hd, 0),
                rows,
                width,
                eps,
                true,
            )
            .unwrap();
        }
        let xs: Vec<f32> = (0..rows * width)
            .map(|i| if with_resid { x[i] + d[i] } else { x[i] })
            .collect();
        let mut want = vec![0f64; rows * width];
        for row in 0..rows {
            let v = &xs[row * width..(row + 1) * width];
            let ms = v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>() / width as f64;
            let rr = 1.0 / (ms + eps as f64).sqrt();
            for c in 0..width {
                want[row * width + c] = v[c] as f64 * rr * w[c] as f64;
            }
        }
        let what = format!("add + RMSNorm {rows}×{width} resid {with_resid}");
        assert_within_a_bf16_ulp(&what, &s.clone_dtoh(&hd).unwrap(), &want, 1e-6);
        assert_eq!(s.clone_dtoh(&xd).unwrap(), xs, "{what}: x after the add");
    }
    for (rows, inter) in [(33, 4864), (12, 18944), (9, 8)] {
        let gu = bf16s(&mut r, rows * 2 * inter, 6.0);
        let scale = [0.75f32, 1.25];
        let gud = s.clone_htod(&gu).unwrap();
        let sd = s.clone_htod(&scale).unwrap();
        let ad = s.alloc_zeros::<bf16>(rows * inter).unwrap();
        // SAFETY: gu holds rows·2·inter bf16, act rows·inter bf16, scale 2 f32.
        unsafe {
            k.swiglu_async(
                k.addr(&gud, 0),
                k.addr(&sd, 0),
                k.addr(&ad, 0),
                rows,
                inter,
                true,
            )
            .unwrap();
        }
        let mut want = vec![0f64; rows * inter];
        for t in 0..rows {
            for i in 0..inter {
                let g = gu[t * 2 * inter + i].to_f64() * scale[0] as f64;
                let u = gu[t * 2 * inter + inter + i].to_f64() * scale[1] as f64;
                want[t * inter + i] = g / (1.0 + (-g).exp()) * u;
            }
        }
        let what = format!("SwiGLU {rows}×{inter}");
        assert_within_a_bf16_ulp(&what, &s.clone_dtoh(&ad).unwrap(), &want, 1e-6);
    }
}

/// The q/k/v epilogue on the CPU (f64): scale, bias, Qwen3's per-head norm, RoPE (rotate
/// half); queries `[T, nh·hd]`, keys and values `[kvh][cap][hd]` at positions pos + t.
struct QkvRef {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn qkv_post_ref(
    qkv: &[f32],
    scale: [f32; 3],
    bias: Option<&[f32]>,
    norm: Option<(&[f32], &[f32])>,
    inv_freq: &[f32],
    (pos, cap): (usize, usize),
    (t_n, nh, kvh, hd): (usize, usize, usize, usize),
    eps: f64,
) -> QkvRef {
    let heads = nh + 2 * kvh;
    let half = hd / 2;
    let mut r = QkvRef {
        q: vec![0.0; t_n * nh * hd],
        k: vec![0.0; kvh * cap * hd],
        v: vec![0.0; kvh * cap * hd],
    };
    for t in 0..t_n {
        let p = pos + t;
        for head in 0..heads {
            let kind = if head < nh {
                0
            } else if head < nh + kvh {
                1
            } else {
                2
            };
            let mut v: Vec<f64> = (0..hd)
                .map(|i| {
                    qkv[t * heads * hd + head * hd + i] as f64 * scale[kind] as f64
                        + bias.map_or(0.0, |b| b[head * hd + i] as f64)
                })
                .collect();
            if kind == 2 {
                let row = ((head - nh - kvh) * cap + p) * hd;
                r.v[row..row + hd].copy_from_slice(&v);
                continue;
            }
            if let Some((qn, kn)) = norm {
                let w = if kind == 0 { qn } else { kn };
                let d = (v.iter().map(|x| x * x).sum::<f64>() / hd as f64 + eps).sqrt();
                for (i, x) in v.iter_mut().enumerate() {
                    *x = *x / d * w[i] as f64;
                }
            }
            let out: Vec<f64> = (0..hd)
                .map(|i| {
                    let j = i % half;
                    let ang = p as f64 * inv_freq[j] as f64;
                    if i < half {
                        v[i] * ang.cos() - v[i + half] * ang.sin()
                    } else {
                        v[i] * ang.cos() + v[i - half] * ang.sin()
                    }
                })
                .collect();
            if kind == 0 {
                let at = t * nh * hd + head * hd;
                r.q[at..at + hd].copy_from_slice(&out);
            } else {
                let row = ((head - nh) * cap + p) * hd;
                r.k[row..row + hd].copy_from_slice(&out);
            }
        }
    }
    r
}

/// The prompt path's q/k/v epilogue (over 8 tokens: hd / 8 lanes per head and token) against
/// the f64 reference: with and without a bias and Qwen3's per-head norm, head dims 32 / 64 /
/// 128 / 256 (a unit per warp), GQA groups of 1 to 7; queries within 2e-4 of the largest (f32
/// angles of positions up to 24), keys and values within a bf16 ulp.
#[test]
#[ignore = "needs a CUDA GPU"]
fn prompt_qkv_epilogue_matches_the_reference() {
    use kiln_kernels::cuda::decode::QkvPost;
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(22);
    let eps = 1e-6f32;
    for (t_n, nh, kvh, hd, with_bias, with_norm) in [
        (12, 4, 2, 64, true, false),
        (9, 7, 1, 128, false, true),
        (20, 2, 2, 32, true, true),
        (10, 4, 2, 64, false, true),
        (9, 4, 1, 256, true, true),
    ] {
        let (pos, heads) = (5usize, nh + 2 * kvh);
        let cap = pos + t_n + 3;
        let f = |r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32| -> Vec<f32> {
            (0..n).map(|_| r.random_range(lo..hi)).collect()
        };
        let qkv = f(&mut r, t_n * heads * hd, -2.0, 2.0);
        let bias = f(&mut r, heads * hd, -0.5, 0.5);
        let (qn, kn) = (f(&mut r, hd, 0.5, 1.5), f(&mut r, hd, 0.5, 1.5));
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
            .collect();
        let scale = [0.9f32, 1.1, 0.8];
        let up = |v: &[f32]| s.clone_htod(v).unwrap();
        let (qkvd, sd, bd, qnd, knd, fd) = (
            up(&qkv),
            up(&scale),
            up(&bias),
            up(&qn),
            up(&kn),
            up(&inv_freq),
        );
        let posd = s.clone_htod(&[pos as i32]).unwrap();
        let qd = s.alloc_zeros::<f32>(t_n * nh * hd).unwrap();
        let kcd = s.alloc_zeros::<bf16>(kvh * cap * hd).unwrap();
        let vcd = s.alloc_zeros::<bf16>(kvh * cap * hd).unwrap();
        let post = QkvPost {
            qkv: k.addr(&qkvd, 0),
            scale: k.addr(&sd, 0),
            bias: if with_bias { k.addr(&bd, 0) } else { 0 },
            q_norm: if with_norm { k.addr(&qnd, 0) } else { 0 },
            k_norm: if with_norm { k.addr(&knd, 0) } else { 0 },
            inv_freq: k.addr(&fd, 0),
            pos: k.addr(&posd, 0),
            q_out: k.addr(&qd, 0),
            k_cache: k.addr(&kcd, 0),
            v_cache: k.addr(&vcd, 0),
        };
        // SAFETY: every buffer is sized as QkvPost describes; pos + T <= cap.
        unsafe { k.qkv_post_async(&post, t_n, nh, kvh, hd, cap, eps) }.unwrap();
        let want = qkv_post_ref(
            &qkv,
            scale,
            with_bias.then_some(&bias[..]),
            with_norm.then_some((&qn[..], &kn[..])),
            &inv_freq,
            (pos, cap),
            (t_n, nh, kvh, hd),
            eps as f64,
        );
        let what = format!(
            "q/k/v epilogue T {t_n} nh {nh} kvh {kvh} hd {hd} bias {with_bias} norm {with_norm}"
        );
        let q = s.clone_dtoh(&qd).unwrap();
        let big = want.q.iter().fold(1f64, |m, v| m.max(v.abs()));
        let dq = q
            .iter()
            .zip(&want.q)
            .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
        assert!(
            dq <= 2e-4 * big,
            "{what}: queries max |Δ| {dq} (scale {big})"
        );
        // only the positions the epilogue wrote (the rest stay zero on both sides)
        let big_kv = want
            .k
            .iter()
            .chain(&want.v)
            .fold(1f64, |m, v| m.max(v.abs()));
        assert_within_a_bf16_ulp(
            &format!("{what}: keys"),
            &s.clone_dtoh(&kcd).unwrap(),
            &want.k,
            2e-4 * big_kv,
        );
        assert_within_a_bf16_ulp(
            &format!("{what}: values"),
            &s.clone_dtoh(&vcd).unwrap(),
            &want.v,
            1e-6,
        );
    }
}

/// The residual stream after `y = x + W·src` the separate way: `tmp = W·src` by the chained
/// GEMV, then the residual add of `kiln_add_rmsnorm` (its norm output is not compared).
fn separate_residual(
    k: &CudaKernels,
    src: &cudarc::driver::CudaSlice<f32>,
    w: &kiln_kernels::cuda::DeviceNvfp4,
    x0: &[f32],
    norm_w: &cudarc::driver::CudaSlice<f32>,
) -> Vec<f32> {
    let s = k.stream().clone();
    let n = w.rows;
    let mut tmp = s.alloc_zeros::<f32>(n).unwrap();
    let xa = s.clone_htod(x0).unwrap();
    let h = s.alloc_zeros::<f32>(n).unwrap();
    k.gemv_chained_async(src, 1, w, &mut tmp).unwrap();
    // SAFETY: x, d, h hold n floats, the weight n.
    unsafe {
        k.add_rmsnorm_async(
            k.addr(&xa, 0),
            k.addr(&tmp, 0),
            k.addr(norm_w, 0),
            k.addr(&h, 0),
            1,
            n,
            1e-6,
            false,
        )
        .unwrap();
    }
    s.clone_dtoh(&xa).unwrap()
}

fn assert_same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let differ = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a.to_bits() != b.to_bits());
    assert_eq!(
        differ,
        0,
        "{what}: {differ} of {} outputs differ from the separate kernels' (first at {first:?}: {:?} vs {:?})",
        got.len(),
        first.map(|i| got[i]),
        first.map(|i| want[i]),
    );
    assert!(want.iter().any(|v| *v != 0.0), "{what}: all zero");
}

/// The fused decode GEMVs (`kiln_gemv_cc_m1_*`) against the separate kernels they replace, on
/// the Qwen2.5-0.5B decode shapes: bit-identical outputs (the same per-element functions and
/// reduction orders), so the fused step can replace the separate one without a tolerance.
#[test]
#[ignore = "needs a CUDA GPU"]
fn fused_decode_gemvs_equal_the_separate_kernels() {
    use kiln_kernels::cuda::gemv_fused::FusedX;
    use kiln_kernels::nvfp4::Nvfp4Tensor;
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(33);
    let vals = |r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..n).map(|_| r.random_range(lo..hi)).collect()
    };
    let upload = |w: &[f32], n: usize, kk: usize| {
        k.upload_nvfp4(&Nvfp4Tensor::quantize(w, n, kk).unwrap())
            .unwrap()
    };
    let (hidden, inter, nh, kvh, hd) = (896usize, 4864usize, 14usize, 2usize, 64usize);
    let eps = 1e-6f32;
    assert_eq!(k.fused_gemv_load_error(), None, "the fused GEMVs must load");

    // RMSNorm folded into the q/k/v and gate/up GEMVs (K = hidden); and a hidden size over
    // 1024 (the separate norm's threads stride the row) with K split across warps
    for (n, hidden) in [
        (nh * hd + 2 * kvh * hd, hidden),
        (2 * inter, hidden),
        (512, 3584),
    ] {
        assert!(k.fused_gemv_fits(n, hidden), "{n} × {hidden}");
        let w = upload(&vals(&mut r, n * hidden, -0.1, 0.1), n, hidden);
        let h = s.clone_htod(&vals(&mut r, hidden, -3.0, 3.0)).unwrap();
        let nw = s.clone_htod(&vals(&mut r, hidden, 0.5, 1.5)).unwrap();
        let normed = s.alloc_zeros::<f32>(hidden).unwrap();
        let mut want = s.alloc_zeros::<f32>(n).unwrap();
        let got = s.alloc_zeros::<f32>(n).unwrap();
        // SAFETY: every buffer holds what the launchers' contracts say.
        unsafe {
            k.add_rmsnorm_async(
                k.addr(&h, 0),
                0,
                k.addr(&nw, 0),
                k.addr(&normed, 0),
                1,
                hidden,
                eps,
                false,
            )
            .unwrap();
            k.gemv_chained_async(&normed, 1, &w, &mut want).unwrap();
            let src = FusedX::Norm {
                h: k.addr(&h, 0),
                weight: k.addr(&nw, 0),
                eps,
            };
            k.gemv_fused_async(&src, &w, k.addr(&got, 0)).unwrap();
        }
        assert_same_bits(
            &format!("norm + GEMV {n} × {hidden}"),
            &s.clone_dtoh(&got).unwrap(),
            &s.clone_dtoh(&want).unwrap(),
        );
    }

    // SwiGLU folded into the down GEMV, the residual add into its store (K = intermediate)
    let norm_w = s.clone_htod(&vec![1.0f32; hidden]).unwrap();
    let w_down = upload(&vals(&mut r, hidden * inter, -0.05, 0.05), hidden, inter);
    let gu = s.clone_htod(&vals(&mut r, 2 * inter, -4.0, 4.0)).unwrap();
    let gu_scale = s.clone_htod(&[0.75f32, 1.25]).unwrap();
    let x0 = vals(&mut r, hidden, -2.0, 2.0);
    let act = s.alloc_zeros::<f32>(inter).unwrap();
    let got = s.clone_htod(&x0).unwrap();
    // SAFETY: as above.
    unsafe {
        k.swiglu_async(
            k.addr(&gu, 0),
            k.addr(&gu_scale, 0),
            k.addr(&act, 0),
            1,
            inter,
            false,
        )
        .unwrap();
    }
    let want = separate_residual(&k, &act, &w_down, &x0, &norm_w);
    // SAFETY: as above.
    unsafe {
        let src = FusedX::SwigluResidual {
            gate_up: k.addr(&gu, 0),
            scales: k.addr(&gu_scale, 0),
        };
        k.gemv_fused_async(&src, &w_down, k.addr(&got, 0)).unwrap();
    }
    assert_same_bits(
        "SwiGLU + down GEMV + residual",
        &s.clone_dtoh(&got).unwrap(),
        &want,
    );

    // the attention's combine folded into the o GEMV (K = heads · head_dim), with splits
    // past the position (ns < splits), one split, and K split across warps (K = 2048); then the
    // o GEMV after a separate combine (x as is, the residual add in the store)
    for (nh, kvh, hd, n, cap, pos, chunk) in [
        (nh, kvh, hd, hidden, 512usize, 100usize, 32usize),
        (nh, kvh, hd, hidden, 64, 40, 64),
        (32, 8, 64, 512, 640, 600, 32),
    ] {
        let splits = cap.div_ceil(chunk);
        assert!(k.fused_combine_fits(n, nh, hd, splits));
        let w_o = upload(&vals(&mut r, n * nh * hd, -0.1, 0.1), n, nh * hd);
        let norm_w = s.clone_htod(&vec![1.0f32; n]).unwrap();
        let q = s.clone_htod(&vals(&mut r, nh * hd, -2.0, 2.0)).unwrap();
        let kc = s.clone_htod(&bf16s(&mut r, kvh * cap * hd, 2.0)).unwrap();
        let vc = s.clone_htod(&bf16s(&mut r, kvh * cap * hd, 1.0)).unwrap();
        let posd = s.clone_htod(&[pos as i32]).unwrap();
        let po = s.alloc_zeros::<f32>(nh * splits * hd).unwrap();
        let pml = s.alloc_zeros::<f32>(nh * splits * 2).unwrap();
        let attn = s.alloc_zeros::<f32>(nh * hd).unwrap();
        let shape = AttentionShape {
            tokens: 1,
            heads: nh,
            kv_heads: kvh,
            head_dim: hd,
            capacity: cap,
            chunk,
            splits,
        };
        let x0 = vals(&mut r, n, -2.0, 2.0);
        let (got, got_plain) = (s.clone_htod(&x0).unwrap(), s.clone_htod(&x0).unwrap());
        // SAFETY: as above.
        unsafe {
            let (qa, ka, va, pa) = (
                k.addr(&q, 0),
                k.addr(&kc, 0),
                k.addr(&vc, 0),
                k.addr(&posd, 0),
            );
            let (oa, ma) = (k.addr(&po, 0), k.addr(&pml, 0));
            k.attention_async(qa, ka, va, pa, oa, ma, Some(k.addr(&attn, 0)), &shape)
                .unwrap();
            let plain = FusedX::Residual {
                x: k.addr(&attn, 0),
            };
            k.gemv_fused_async(&plain, &w_o, k.addr(&got_plain, 0))
                .unwrap();
            k.attention_async(qa, ka, va, pa, oa, ma, None, &shape)
                .unwrap();
            let src = FusedX::CombineResidual {
                part_o: oa,
                part_ml: ma,
                pos: pa,
                head_dim: hd,
                splits,
                chunk,
            };
            k.gemv_fused_async(&src, &w_o, k.addr(&got, 0)).unwrap();
        }
        let want = separate_residual(&k, &attn, &w_o, &x0, &norm_w);
        let what =
            format!("{nh} heads × {hd}, o {n} rows, capacity {cap}, pos {pos}, chunk {chunk}");
        assert_same_bits(
            &format!("combine + o GEMV + residual ({what})"),
            &s.clone_dtoh(&got).unwrap(),
            &want,
        );
        assert_same_bits(
            &format!("o GEMV + residual ({what})"),
            &s.clone_dtoh(&got_plain).unwrap(),
            &want,
        );
    }

    // a shape the fused kernels do not take (K % 32 != 0) is refused with the reason
    let big = k.alloc_nvfp4(64, 48).unwrap();
    let y = s.alloc_zeros::<f32>(64).unwrap();
    let x = s.alloc_zeros::<f32>(64).unwrap();
    // SAFETY: refused before any launch.
    let err = unsafe {
        k.gemv_fused_async(
            &FusedX::Norm {
                h: k.addr(&x, 0),
                weight: k.addr(&x, 0),
                eps,
            },
            &big,
            k.addr(&y, 0),
        )
    }
    .unwrap_err()
    .to_string();
    assert!(err.contains("separate kernels"), "{err}");
}
