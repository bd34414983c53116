//! GPU checks of the train step's kernels (`train.cu`, and the flash attention of
//! `attention_train.cu`) against CPU references written here in f64, on random inputs (ignored
//! without a GPU). Every backward kernel is checked twice: element by element against the
//! analytic f64 gradient, and that gradient's formula against a central finite difference of
//! the f64 forward along a random direction (so a wrong formula cannot pass by matching
//! itself).
//!
//! Tolerances: outputs stored as bf16 agree to half a bf16 ulp (2^-8 relative) of the f64 value
//! plus the CUDA fast `expf` / `sincosf` error (~1e-6 relative); f32 outputs to 1e-5 relative
//! to the largest value (summation order and fast math); the finite-difference checks to 1e-3
//! relative for f32 gradients and 2e-2 for bf16 ones. The fake-quant and the AdamW step without
//! clipping are bit-exact (the same IEEE operations in the same order as the CPU).

// The references index several arrays by the same row / column, as the kernels do.
#![allow(clippy::needless_range_loop)]

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use kiln_kernels::cpu::adamw::{MOMENT1_SR_SALT, MOMENT2_SR_SALT};
use kiln_kernels::cpu::{AdamWParams, AdamWScalars};
use kiln_kernels::cuda::train::{TrainAttnShape, TrainTensor};
use kiln_kernels::cuda::{CudaKernels, DeviceInput};
use kiln_kernels::nvfp4::codec::{f32_to_bf16_stochastic, sr_uniform};
use kiln_kernels::nvfp4::Nvfp4Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> CudaKernels {
    CudaKernels::new(0).unwrap_or_else(|e| panic!("GPU test run where CUDA is not usable: {e}"))
}

fn rand_vec(r: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

fn up(s: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<f32> {
    s.clone_htod(v).unwrap()
}

fn up_bf16(s: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<bf16> {
    let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    s.clone_htod(&b).unwrap()
}

fn down(s: &Arc<CudaStream>, d: &CudaSlice<f32>) -> Vec<f32> {
    s.clone_dtoh(d).unwrap()
}

fn down_bf16(s: &Arc<CudaStream>, d: &CudaSlice<bf16>) -> Vec<f32> {
    s.clone_dtoh(d)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect()
}

/// Each element within half a bf16 ulp of the f64 value (plus `abs`).
fn assert_bf16_close(what: &str, got: &[f32], want: &[f64], abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = w.abs() / 256.0 + abs;
        let d = (g as f64 - w).abs();
        assert!(
            d <= tol,
            "{what}[{i}]: got {g}, want {w} (|Δ| {d:.3e} > {tol:.3e})"
        );
        worst = worst.max(d / tol);
    }
    eprintln!("{what}: worst |Δ| / tolerance {worst:.3}");
}

/// Every element within `rel` of the largest |value| (at least 1); a NaN fails.
fn assert_f32_close(what: &str, got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
    let (mut d, mut at) = (0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs();
        if e > d || e.is_nan() {
            (d, at) = (e, i);
        }
    }
    eprintln!("{what}: max |Δ| {d:.3e} at {at} (scale {scale:.3})");
    assert!(
        d <= rel * scale,
        "{what}: max |Δ| {d:.3e} at {at} (got {}, want {}) > {rel} × {scale:.3}",
        got[at],
        want[at]
    );
}

/// `⟨grad, v⟩` against `(L(x + εv) − L(x − εv)) / 2ε` for a random direction `v`.
fn assert_directional(
    what: &str,
    r: &mut ChaCha8Rng,
    x: &[f64],
    grad: &[f64],
    loss: impl Fn(&[f64]) -> f64,
    rel: f64,
) {
    let v: Vec<f64> = (0..x.len()).map(|_| r.random_range(-1.0..1.0)).collect();
    let eps = 1e-5;
    let shifted =
        |sign: f64| -> Vec<f64> { x.iter().zip(&v).map(|(a, b)| a + sign * eps * b).collect() };
    let fd = (loss(&shifted(1.0)) - loss(&shifted(-1.0))) / (2.0 * eps);
    let an: f64 = grad.iter().zip(&v).map(|(g, d)| g * d).sum();
    eprintln!("{what}: directional derivative {an:.6e}, finite difference {fd:.6e}");
    assert!(
        (an - fd).abs() <= rel * fd.abs().max(1e-3),
        "{what}: gradient · v = {an}, finite difference {fd}"
    );
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_gathers_rows_and_scatter_adds_repeated_ids() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let (vocab, h, n) = (50usize, 96usize, 40usize);
    let table = rand_vec(&mut r, vocab * h, -1.0, 1.0);
    // Repeated ids: the backward must add their gradients.
    let ids: Vec<i32> = (0..n).map(|i| (i % 7) as i32 * 3).collect();
    let dh = rand_vec(&mut r, n * h, -1.0, 1.0);
    let (td, idd, dhd) = (up(&s, &table), s.clone_htod(&ids).unwrap(), up(&s, &dh));
    let hd = s.alloc_zeros::<f32>(n * h).unwrap();
    let dtd = s.alloc_zeros::<f32>(vocab * h).unwrap();
    // SAFETY: buffers sized as the launchers say.
    unsafe {
        k.train_embed_fwd_async(k.addr(&idd, 0), k.addr(&td, 0), k.addr(&hd, 0), n, h)
            .unwrap();
        k.train_embed_bwd_async(k.addr(&idd, 0), k.addr(&dhd, 0), k.addr(&dtd, 0), n, h)
            .unwrap();
    }
    let got = down(&s, &hd);
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        assert_eq!(got[i * h..(i + 1) * h], table[id * h..(id + 1) * h]);
    }
    let mut want = vec![0f64; vocab * h];
    for (i, &id) in ids.iter().enumerate() {
        for c in 0..h {
            want[id as usize * h + c] += dh[i * h + c] as f64;
        }
    }
    assert_f32_close("embedding scatter-add", &down(&s, &dtd), &want, 1e-6);
}

/// y = h·r·w per row, r = 1/sqrt(mean(h²) + eps).
fn rmsnorm_ref(h: &[f64], w: &[f64], width: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let rows = h.len() / width;
    let mut y = vec![0f64; h.len()];
    let mut rs = vec![0f64; rows];
    for n in 0..rows {
        let row = &h[n * width..(n + 1) * width];
        let r = 1.0 / (row.iter().map(|x| x * x).sum::<f64>() / width as f64 + eps).sqrt();
        rs[n] = r;
        for i in 0..width {
            y[n * width + i] = row[i] * r * w[i];
        }
    }
    (y, rs)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rmsnorm_forward_and_backward_match_the_reference_and_finite_differences() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(2);
    let eps = 1e-6f32;
    // 896: the 0.5B width; 5120: the 14B width (the backward's widest block); 70 rows: more
    // than one block of 32 rows and a partial one.
    for &(rows, width) in &[(70usize, 896usize), (40, 5120), (3, 64)] {
        let h = rand_vec(&mut r, rows * width, -2.0, 2.0);
        let w = rand_vec(&mut r, width, 0.5, 1.5);
        let dy = rand_vec(&mut r, rows * width, -1.0, 1.0);
        let dh0 = rand_vec(&mut r, rows * width, -1.0, 1.0);
        let (hd, wd, dyd, dhd) = (up(&s, &h), up(&s, &w), up(&s, &dy), up(&s, &dh0));
        let yd = s.alloc_zeros::<bf16>(rows * width).unwrap();
        let rd = s.alloc_zeros::<f32>(rows).unwrap();
        let dwd = s.alloc_zeros::<f32>(width).unwrap();
        // SAFETY: buffers sized as the launchers say.
        unsafe {
            k.train_rmsnorm_fwd_async(
                k.addr(&hd, 0),
                k.addr(&wd, 0),
                k.addr(&yd, 0),
                k.addr(&rd, 0),
                rows,
                width,
                eps,
            )
            .unwrap();
            k.train_rmsnorm_bwd_async(
                k.addr(&hd, 0),
                k.addr(&wd, 0),
                k.addr(&rd, 0),
                k.addr(&dyd, 0),
                k.addr(&dhd, 0),
                k.addr(&dwd, 0),
                rows,
                width,
            )
            .unwrap();
        }
        let (h64, w64, dy64) = (f64s(&h), f64s(&w), f64s(&dy));
        let (y, rs) = rmsnorm_ref(&h64, &w64, width, eps as f64);
        assert_bf16_close(
            &format!("rmsnorm y {rows}×{width}"),
            &down_bf16(&s, &yd),
            &y,
            1e-6,
        );
        assert_f32_close(
            &format!("rmsnorm r {rows}×{width}"),
            &down(&s, &rd),
            &rs,
            1e-6,
        );
        // Analytic gradients.
        let mut dh_want = f64s(&dh0);
        let mut dw_want = vec![0f64; width];
        for n in 0..rows {
            let b = n * width;
            let dot: f64 = (0..width).map(|i| dy64[b + i] * w64[i] * h64[b + i]).sum();
            let c = rs[n].powi(3) * dot / width as f64;
            for i in 0..width {
                dh_want[b + i] += rs[n] * w64[i] * dy64[b + i] - h64[b + i] * c;
                dw_want[i] += dy64[b + i] * h64[b + i] * rs[n];
            }
        }
        let dh_got = down(&s, &dhd);
        let dw_got = down(&s, &dwd);
        assert_f32_close(
            &format!("rmsnorm dh {rows}×{width}"),
            &dh_got,
            &dh_want,
            1e-5,
        );
        assert_f32_close(
            &format!("rmsnorm dw {rows}×{width}"),
            &dw_got,
            &dw_want,
            1e-5,
        );
        // The formula against finite differences of L = Σ dy·y (dh without the residual's dh0).
        let grad_h: Vec<f64> = dh_got
            .iter()
            .zip(&dh0)
            .map(|(a, b)| (a - b) as f64)
            .collect();
        let loss_h = |x: &[f64]| -> f64 {
            let (y, _) = rmsnorm_ref(x, &w64, width, eps as f64);
            y.iter().zip(&dy64).map(|(a, b)| a * b).sum()
        };
        assert_directional("rmsnorm dh", &mut r, &h64, &grad_h, loss_h, 1e-3);
        let loss_w = |x: &[f64]| -> f64 {
            let (y, _) = rmsnorm_ref(&h64, x, width, eps as f64);
            y.iter().zip(&dy64).map(|(a, b)| a * b).sum()
        };
        assert_directional("rmsnorm dw", &mut r, &w64, &f64s(&dw_got), loss_w, 1e-3);
    }
}

/// The q/k/v epilogue on the CPU: (q, k, v) in the attention layouts from `[N, qkv_cols]`.
fn qkv_ref(
    sh: TrainAttnShape,
    qkv: &[f64],
    bias: &[f64],
    inv_freq: &[f32],
    sign: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (t_len, nh, kvh, hd) = (sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let (rep, half, cols) = (sh.rep(), hd / 2, sh.qkv_cols());
    let mut q = vec![0f64; sh.tokens() * nh * hd];
    let mut k = vec![0f64; sh.tokens() * kvh * hd];
    let mut v = vec![0f64; sh.tokens() * kvh * hd];
    for n in 0..sh.tokens() {
        let (b, t) = (n / t_len, n % t_len);
        for head in 0..nh + 2 * kvh {
            for i in 0..half {
                let (c0, c1) = (head * hd + i, head * hd + i + half);
                let (mut a, mut c) = (qkv[n * cols + c0] + bias[c0], qkv[n * cols + c1] + bias[c1]);
                if head < nh + kvh {
                    let ang = (t as f32 * inv_freq[i]) as f64;
                    let (sn, cs) = (sign * ang.sin(), ang.cos());
                    (a, c) = (a * cs - c * sn, c * cs + a * sn);
                }
                let (dst, out) = if head < nh {
                    let (g, rr) = (head / rep, head % rep);
                    ((((b * kvh + g) * rep + rr) * t_len + t) * hd, &mut q)
                } else if head < nh + kvh {
                    (((b * kvh + head - nh) * t_len + t) * hd, &mut k)
                } else {
                    (((b * kvh + head - nh - kvh) * t_len + t) * hd, &mut v)
                };
                out[dst + i] = a;
                out[dst + i + half] = c;
            }
        }
    }
    (q, k, v)
}

fn inv_freq(hd: usize, theta: f32) -> Vec<f32> {
    (0..hd / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / hd as f32))
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn qkv_epilogue_ropes_into_the_group_layout_and_its_backward_is_the_transpose() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let sh = TrainAttnShape {
        batch: 2,
        seq: 37,
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
    };
    let (n, cols) = (sh.tokens(), sh.qkv_cols());
    let f = inv_freq(sh.head_dim, 1_000_000.0);
    let qkv = rand_vec(&mut r, n * cols, -2.0, 2.0);
    let bias = rand_vec(&mut r, cols, -0.5, 0.5);
    let (qkvd, bd, fd) = (up(&s, &qkv), up(&s, &bias), up(&s, &f));
    let qd = s.alloc_zeros::<bf16>(n * sh.heads * sh.head_dim).unwrap();
    let kd = s
        .alloc_zeros::<bf16>(n * sh.kv_heads * sh.head_dim)
        .unwrap();
    let vd = s
        .alloc_zeros::<bf16>(n * sh.kv_heads * sh.head_dim)
        .unwrap();
    // Gradients arriving in the attention layouts.
    let dq = rand_vec(&mut r, n * sh.heads * sh.head_dim, -1.0, 1.0);
    let dk = rand_vec(&mut r, n * sh.kv_heads * sh.head_dim, -1.0, 1.0);
    let dv = rand_vec(&mut r, n * sh.kv_heads * sh.head_dim, -1.0, 1.0);
    let (dqd, dkd, dvd) = (up(&s, &dq), up(&s, &dk), up(&s, &dv));
    let dqkvd = s.alloc_zeros::<bf16>(n * cols).unwrap();
    let dbd = s.alloc_zeros::<f32>(cols).unwrap();
    // SAFETY: buffers sized as the launchers say.
    unsafe {
        k.train_qkv_fwd_async(
            sh,
            k.addr(&qkvd, 0),
            k.addr(&bd, 0),
            k.addr(&fd, 0),
            k.addr(&qd, 0),
            k.addr(&kd, 0),
            k.addr(&vd, 0),
        )
        .unwrap();
        k.train_qkv_bwd_async(
            sh,
            k.addr(&dqd, 0),
            k.addr(&dkd, 0),
            k.addr(&dvd, 0),
            k.addr(&fd, 0),
            k.addr(&dqkvd, 0),
            k.addr(&dbd, 0),
        )
        .unwrap();
    }
    let (q, kk, v) = qkv_ref(sh, &f64s(&qkv), &f64s(&bias), &f, 1.0);
    assert_bf16_close("qkv q", &down_bf16(&s, &qd), &q, 1e-5);
    assert_bf16_close("qkv k", &down_bf16(&s, &kd), &kk, 1e-5);
    assert_bf16_close("qkv v", &down_bf16(&s, &vd), &v, 1e-6);
    // Backward: L = ⟨dq, q⟩ + ⟨dk, k⟩ + ⟨dv, v⟩ as a function of qkv.
    let (dq64, dk64, dv64) = (f64s(&dq), f64s(&dk), f64s(&dv));
    let zero_bias = vec![0f64; cols];
    let loss = |x: &[f64]| -> f64 {
        let (q, k, v) = qkv_ref(sh, x, &zero_bias, &f, 1.0);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        dot(&q, &dq64) + dot(&k, &dk64) + dot(&v, &dv64)
    };
    let got = down_bf16(&s, &dqkvd);
    // The analytic gradient: the inverse rotation, scattered back to [N, cols].
    let mut want = vec![0f64; n * cols];
    {
        let (t_len, nh, kvh, hd) = (sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
        let (rep, half) = (sh.rep(), hd / 2);
        for nn in 0..n {
            let (b, t) = (nn / t_len, nn % t_len);
            for head in 0..nh + 2 * kvh {
                for i in 0..half {
                    let (src, g) = if head < nh {
                        let (g, rr) = (head / rep, head % rep);
                        ((((b * kvh + g) * rep + rr) * t_len + t) * hd, &dq64)
                    } else if head < nh + kvh {
                        (((b * kvh + head - nh) * t_len + t) * hd, &dk64)
                    } else {
                        (((b * kvh + head - nh - kvh) * t_len + t) * hd, &dv64)
                    };
                    let (mut a, mut c) = (g[src + i], g[src + i + half]);
                    if head < nh + kvh {
                        let ang = (t as f32 * f[i]) as f64;
                        let (sn, cs) = (-ang.sin(), ang.cos());
                        (a, c) = (a * cs - c * sn, c * cs + a * sn);
                    }
                    want[nn * cols + head * hd + i] = a;
                    want[nn * cols + head * hd + i + half] = c;
                }
            }
        }
    }
    assert_bf16_close("qkv dqkv", &got, &want, 1e-5);
    assert_directional("qkv dqkv", &mut r, &f64s(&qkv), &want, loss, 1e-6);
    let mut db = vec![0f64; cols];
    for nn in 0..n {
        for c in 0..cols {
            db[c] += want[nn * cols + c];
        }
    }
    assert_f32_close("qkv dbias", &down(&s, &dbd), &db, 1e-5);
}

/// Qwen3's per-head q/k norm on `[N, qkv_cols]`: the q heads normed with `qw`, the k heads
/// with `kw`, the v heads unchanged.
fn head_norm_ref(sh: TrainAttnShape, x: &[f64], qw: &[f64], kw: &[f64], eps: f64) -> Vec<f64> {
    let (nh, kvh, hd) = (sh.heads, sh.kv_heads, sh.head_dim);
    let cols = sh.qkv_cols();
    let mut y = x.to_vec();
    for n in 0..x.len() / cols {
        for j in 0..nh + kvh {
            let b = n * cols + j * hd;
            let w = if j < nh { qw } else { kw };
            let (yy, _) = rmsnorm_ref(&x[b..b + hd], w, hd, eps);
            y[b..b + hd].copy_from_slice(&yy);
        }
    }
    y
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn per_head_qk_norm_and_its_backward_match_the_reference_and_finite_differences() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let eps = 1e-6f32;
    // The tiny Qwen3 test shape, and the Qwen3-8B heads (32 q, 8 k, head_dim 128) over 70
    // tokens: more than one block of 32 tokens and a partial one.
    for (batch, seq, heads, kv_heads, head_dim) in [(2, 5, 4, 2, 16), (2, 35, 32, 8, 128)] {
        let sh = TrainAttnShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
        };
        let (n, cols, hd) = (sh.tokens(), sh.qkv_cols(), sh.head_dim);
        let rows = n * (heads + kv_heads);
        let x = rand_vec(&mut r, n * cols, -2.0, 2.0);
        let qw = rand_vec(&mut r, hd, 0.5, 1.5);
        let kw = rand_vec(&mut r, hd, 0.5, 1.5);
        // The incoming gradient, as the epilogue backward leaves it (bf16).
        let dy: Vec<f32> = rand_vec(&mut r, n * cols, -1.0, 1.0)
            .into_iter()
            .map(|v| bf16::from_f32(v).to_f32())
            .collect();
        let (xd, qwd, kwd, dyd) = (up(&s, &x), up(&s, &qw), up(&s, &kw), up_bf16(&s, &dy));
        let xhd = s.alloc_zeros::<bf16>(rows * hd).unwrap();
        let rsd = s.alloc_zeros::<f32>(rows).unwrap();
        let dqwd = s.alloc_zeros::<f32>(hd).unwrap();
        let dkwd = s.alloc_zeros::<f32>(hd).unwrap();
        // SAFETY: buffers sized as the launchers say.
        unsafe {
            k.train_head_norm_fwd_async(
                sh,
                k.addr(&xd, 0),
                k.addr(&qwd, 0),
                k.addr(&kwd, 0),
                k.addr(&xhd, 0),
                k.addr(&rsd, 0),
                eps,
            )
            .unwrap();
            k.train_head_norm_bwd_async(
                sh,
                k.addr(&dyd, 0),
                k.addr(&xhd, 0),
                k.addr(&rsd, 0),
                k.addr(&qwd, 0),
                k.addr(&kwd, 0),
                k.addr(&dqwd, 0),
                k.addr(&dkwd, 0),
            )
            .unwrap();
        }
        let (x64, qw64, kw64, dy64) = (f64s(&x), f64s(&qw), f64s(&kw), f64s(&dy));
        let what = format!("head norm {n}×{heads}/{kv_heads}×{hd}");
        let y = head_norm_ref(sh, &x64, &qw64, &kw64, eps as f64);
        assert_f32_close(&format!("{what} y"), &down(&s, &xd), &y, 1e-5);
        // Analytic gradients; the v heads' gradient passes through untouched.
        let mut dx = dy64.clone();
        let (mut dqw, mut dkw) = (vec![0f64; hd], vec![0f64; hd]);
        for nn in 0..n {
            for j in 0..heads + kv_heads {
                let b = nn * cols + j * hd;
                let row = &x64[b..b + hd];
                let rr = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / hd as f64 + 1e-6).sqrt();
                let (w, dw) = if j < heads {
                    (&qw64, &mut dqw)
                } else {
                    (&kw64, &mut dkw)
                };
                let dot: f64 = (0..hd).map(|i| dy64[b + i] * w[i] * row[i]).sum();
                for i in 0..hd {
                    dx[b + i] = rr * w[i] * dy64[b + i] - row[i] * rr.powi(3) * dot / hd as f64;
                    dw[i] += dy64[b + i] * row[i] * rr;
                }
            }
        }
        let dx_got = down_bf16(&s, &dyd);
        // x̂ is saved as bf16: the input gradient is good to about a bf16 ulp of its terms.
        assert_f32_close(&format!("{what} dx"), &dx_got, &dx, 1e-2);
        assert_f32_close(&format!("{what} dqw"), &down(&s, &dqwd), &dqw, 1e-2);
        assert_f32_close(&format!("{what} dkw"), &down(&s, &dkwd), &dkw, 1e-2);
        // The formula against finite differences of L = Σ dy·y.
        let loss_x = |v: &[f64]| -> f64 {
            let y = head_norm_ref(sh, v, &qw64, &kw64, eps as f64);
            y.iter().zip(&dy64).map(|(a, b)| a * b).sum()
        };
        assert_directional(&format!("{what} dx"), &mut r, &x64, &dx, loss_x, 1e-3);
        let loss_q = |w: &[f64]| -> f64 {
            let y = head_norm_ref(sh, &x64, w, &kw64, eps as f64);
            y.iter().zip(&dy64).map(|(a, b)| a * b).sum()
        };
        assert_directional(&format!("{what} dqw"), &mut r, &qw64, &dqw, loss_q, 1e-3);
    }
}

/// Causal softmax of each row (position row % seq) of `s` scaled by `scale`.
fn softmax_ref(s: &[f64], seq: usize, scale: f64) -> Vec<f64> {
    let mut p = vec![0f64; s.len()];
    for (i, (x, out)) in s.chunks(seq).zip(p.chunks_mut(seq)).enumerate() {
        let len = i % seq + 1;
        let m = x[..len]
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(v * scale));
        let e: Vec<f64> = x[..len].iter().map(|&v| (v * scale - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        for j in 0..len {
            out[j] = e[j] / sum;
        }
    }
    p
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn causal_softmax_and_its_backward_match_the_reference_and_finite_differences() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(4);
    let (seq, groups) = (45usize, 6usize);
    let rows = seq * groups;
    let scale = 1.0 / (64f32).sqrt();
    let sc = rand_vec(&mut r, rows * seq, -8.0, 8.0);
    let dp = rand_vec(&mut r, rows * seq, -1.0, 1.0);
    let (sd, dpd) = (up(&s, &sc), up(&s, &dp));
    let pd = s.alloc_zeros::<bf16>(rows * seq).unwrap();
    let dsd = s.alloc_zeros::<bf16>(rows * seq).unwrap();
    // SAFETY: buffers sized as the launchers say.
    unsafe {
        k.train_causal_softmax_async(k.addr(&sd, 0), k.addr(&pd, 0), rows, seq, scale)
            .unwrap();
        k.train_softmax_bwd_async(
            k.addr(&pd, 0),
            k.addr(&dpd, 0),
            k.addr(&dsd, 0),
            rows,
            seq,
            scale,
        )
        .unwrap();
    }
    let p = softmax_ref(&f64s(&sc), seq, scale as f64);
    let p_got = down_bf16(&s, &pd);
    assert_bf16_close("causal softmax", &p_got, &p, 1e-6);
    // The backward from the bf16 p the forward stored.
    let dp64 = f64s(&dp);
    let mut ds = vec![0f64; rows * seq];
    for i in 0..rows {
        let b = i * seq;
        let dot: f64 = (0..seq).map(|j| p_got[b + j] as f64 * dp64[b + j]).sum();
        for j in 0..seq {
            ds[b + j] = scale as f64 * p_got[b + j] as f64 * (dp64[b + j] - dot);
        }
    }
    let ds_got = down_bf16(&s, &dsd);
    assert_bf16_close("softmax ds", &ds_got, &ds, 1e-6);
    let loss = |x: &[f64]| -> f64 {
        softmax_ref(x, seq, scale as f64)
            .iter()
            .zip(&dp64)
            .map(|(a, b)| a * b)
            .sum()
    };
    assert_directional("softmax ds", &mut r, &f64s(&sc), &f64s(&ds_got), loss, 2e-2);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn merge_and_split_heads_are_inverse_permutations() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let sh = TrainAttnShape {
        batch: 3,
        seq: 11,
        heads: 8,
        kv_heads: 2,
        head_dim: 32,
    };
    let len = sh.tokens() * sh.heads * sh.head_dim;
    let o = rand_vec(&mut r, len, -3.0, 3.0);
    let od = up(&s, &o);
    let merged = s.alloc_zeros::<bf16>(len).unwrap();
    // SAFETY: buffers sized as the launchers say.
    unsafe {
        k.train_merge_heads_async(sh, k.addr(&od, 0), k.addr(&merged, 0))
            .unwrap();
    }
    let m = down_bf16(&s, &merged);
    let (t_len, rep, hd) = (sh.seq, sh.rep(), sh.head_dim);
    for n in 0..sh.tokens() {
        let (b, t) = (n / t_len, n % t_len);
        for head in 0..sh.heads {
            let (g, rr) = (head / rep, head % rep);
            for i in 0..hd {
                let src = (((b * sh.kv_heads + g) * rep + rr) * t_len + t) * hd + i;
                assert_eq!(
                    m[n * sh.heads * hd + head * hd + i],
                    bf16::from_f32(o[src]).to_f32()
                );
            }
        }
    }
    let md = up(&s, &m);
    let back = s.alloc_zeros::<bf16>(len).unwrap();
    // SAFETY: as above.
    unsafe {
        k.train_split_heads_async(sh, k.addr(&md, 0), k.addr(&back, 0))
            .unwrap();
    }
    let want: Vec<f32> = o.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    assert_eq!(down_bf16(&s, &back), want);
}

fn swiglu_ref(gu: &[f64], inter: usize) -> Vec<f64> {
    let rows = gu.len() / (2 * inter);
    let mut a = vec![0f64; rows * inter];
    for n in 0..rows {
        for i in 0..inter {
            let (g, u) = (gu[n * 2 * inter + i], gu[n * 2 * inter + inter + i]);
            a[n * inter + i] = g / (1.0 + (-g).exp()) * u;
        }
    }
    a
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn swiglu_forward_and_backward_match_the_reference_and_finite_differences() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(6);
    let (rows, inter) = (19usize, 300usize);
    let gu = rand_vec(&mut r, rows * 2 * inter, -6.0, 6.0);
    let da = rand_vec(&mut r, rows * inter, -1.0, 1.0);
    let (gud, dad) = (up(&s, &gu), up(&s, &da));
    let ad = s.alloc_zeros::<bf16>(rows * inter).unwrap();
    let dgud = s.alloc_zeros::<bf16>(rows * 2 * inter).unwrap();
    // SAFETY: buffers sized as the launchers say.
    unsafe {
        k.train_swiglu_fwd_async(k.addr(&gud, 0), k.addr(&ad, 0), rows, inter)
            .unwrap();
        k.train_swiglu_bwd_async(
            k.addr(&gud, 0),
            k.addr(&dad, 0),
            k.addr(&dgud, 0),
            rows,
            inter,
        )
        .unwrap();
    }
    let gu64 = f64s(&gu);
    assert_bf16_close(
        "swiglu a",
        &down_bf16(&s, &ad),
        &swiglu_ref(&gu64, inter),
        1e-6,
    );
    let da64 = f64s(&da);
    let mut want = vec![0f64; rows * 2 * inter];
    for n in 0..rows {
        for i in 0..inter {
            let (g, u) = (gu64[n * 2 * inter + i], gu64[n * 2 * inter + inter + i]);
            let sg = 1.0 / (1.0 + (-g).exp());
            let d = da64[n * inter + i];
            want[n * 2 * inter + i] = d * u * sg * (1.0 + g * (1.0 - sg));
            want[n * 2 * inter + inter + i] = d * g * sg;
        }
    }
    let got = down_bf16(&s, &dgud);
    assert_bf16_close("swiglu dgu", &got, &want, 1e-6);
    let loss = |x: &[f64]| -> f64 {
        swiglu_ref(x, inter)
            .iter()
            .zip(&da64)
            .map(|(a, b)| a * b)
            .sum()
    };
    assert_directional("swiglu dgu", &mut r, &gu64, &f64s(&got), loss, 2e-2);
}

fn cross_entropy_ref(
    logits: &[f64],
    target: &[i32],
    weight: &[f32],
    vocab: usize,
) -> (f64, Vec<f64>) {
    let mut loss = 0f64;
    let mut d = vec![0f64; logits.len()];
    for (n, row) in logits.chunks(vocab).enumerate() {
        let w = weight[n] as f64;
        if w == 0.0 {
            continue;
        }
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|x| (x - m).exp()).sum();
        let t = target[n] as usize;
        loss += w * (m + sum.ln() - row[t]);
        for j in 0..vocab {
            d[n * vocab + j] = w * ((row[j] - m).exp() / sum - if j == t { 1.0 } else { 0.0 });
        }
    }
    (loss, d)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cross_entropy_gives_the_weighted_loss_and_its_gradient() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(7);
    for &(rows, vocab) in &[(12usize, 1000usize), (3, 151_936)] {
        let logits = rand_vec(&mut r, rows * vocab, -4.0, 4.0);
        let target: Vec<i32> = (0..rows).map(|_| r.random_range(0..vocab as i32)).collect();
        // Every third token is outside the loss.
        let inside = (0..rows).filter(|n| n % 3 != 1).count() as f32;
        let weight: Vec<f32> = (0..rows)
            .map(|n| if n % 3 == 1 { 0.0 } else { 1.0 / inside })
            .collect();
        let (ld, td, wd) = (
            up(&s, &logits),
            s.clone_htod(&target).unwrap(),
            up(&s, &weight),
        );
        let dld = s.alloc_zeros::<bf16>(rows * vocab).unwrap();
        let lossd = s.alloc_zeros::<f64>(1).unwrap();
        // SAFETY: buffers sized as the launcher says.
        unsafe {
            k.train_cross_entropy_async(
                k.addr(&ld, 0),
                k.addr(&td, 0),
                k.addr(&wd, 0),
                k.addr(&dld, 0),
                k.addr(&lossd, 0),
                rows,
                vocab,
            )
            .unwrap();
        }
        let l64 = f64s(&logits);
        let (loss, d) = cross_entropy_ref(&l64, &target, &weight, vocab);
        let got_loss = s.clone_dtoh(&lossd).unwrap()[0];
        eprintln!("cross-entropy {rows}×{vocab}: loss {got_loss:.6} (reference {loss:.6})");
        assert!(
            (got_loss - loss).abs() <= 1e-5 * loss.abs(),
            "loss {got_loss} vs {loss}"
        );
        let got = down_bf16(&s, &dld);
        assert_bf16_close(
            &format!("cross-entropy dlogits {rows}×{vocab}"),
            &got,
            &d,
            1e-9,
        );
        let loss_fn = |x: &[f64]| cross_entropy_ref(x, &target, &weight, vocab).0;
        assert_directional(
            "cross-entropy dlogits",
            &mut r,
            &l64,
            &f64s(&got),
            loss_fn,
            2e-2,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fake_quant_equals_the_cpu_quantize_then_dequantize_bit_for_bit() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(8);
    let (rows, cols) = (96usize, 384usize);
    let mut w: Vec<f32> = (0..rows * cols)
        .map(|_| r.random_range(-1.0f32..1.0).powi(3))
        .collect();
    w[5] = 7.5; // an outlier sets the tensor scale
    for v in &mut w[cols..cols + 16] {
        *v = 0.0; // an all-zero block
    }
    let wd = up(&s, &w);
    let out = s.alloc_zeros::<bf16>(rows * cols).unwrap();
    let mut status = k.alloc_status().unwrap();
    k.amax_async(DeviceInput::F32(&wd), &mut status).unwrap();
    // SAFETY: buffers sized as the launcher says.
    unsafe {
        k.train_fakequant_bf16_async(k.addr(&wd, 0), &status, k.addr(&out, 0), rows * cols)
            .unwrap();
    }
    let got: Vec<bf16> = s.clone_dtoh(&out).unwrap();
    let want: Vec<bf16> = Nvfp4Tensor::quantize(&w, rows, cols)
        .unwrap()
        .dequantize()
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(
        diff,
        0,
        "{diff} of {} fake-quantized values differ",
        w.len()
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn multi_tensor_adamw_matches_the_cpu_step() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let sizes = [5000usize, 17, 10_000, 4096];
    let hp = AdamWParams {
        lr: 1e-2,
        ..AdamWParams::default()
    };
    let sc = AdamWScalars::new(hp, 3, 11);
    // (clip threshold as a fraction of the norm, bf16 moments)
    for &(clip_frac, bf16_m) in &[(0.0f64, false), (0.5, false), (0.0, true)] {
        let w: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| rand_vec(&mut r, n, -1.0, 1.0))
            .collect();
        let g: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| rand_vec(&mut r, n, -0.1, 0.1))
            .collect();
        let round = |v: Vec<f32>| -> Vec<f32> {
            if bf16_m {
                v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
            } else {
                v
            }
        };
        let m: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| round(rand_vec(&mut r, n, -0.01, 0.01)))
            .collect();
        let v: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| round(rand_vec(&mut r, n, 0.0, 1e-3)))
            .collect();
        let norm = g
            .iter()
            .flatten()
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt();
        let max_norm = (clip_frac * norm) as f32;
        // Device buffers (moments in their stored type).
        let wd: Vec<CudaSlice<f32>> = w.iter().map(|x| up(&s, x)).collect();
        let gd: Vec<CudaSlice<f32>> = g.iter().map(|x| up(&s, x)).collect();
        let md32: Vec<CudaSlice<f32>> = m.iter().map(|x| up(&s, x)).collect();
        let vd32: Vec<CudaSlice<f32>> = v.iter().map(|x| up(&s, x)).collect();
        let md16: Vec<CudaSlice<bf16>> = m.iter().map(|x| up_bf16(&s, x)).collect();
        let vd16: Vec<CudaSlice<bf16>> = v.iter().map(|x| up_bf16(&s, x)).collect();
        let tensors: Vec<TrainTensor> = (0..sizes.len())
            .map(|i| TrainTensor {
                w: k.addr(&wd[i], 0),
                g: k.addr(&gd[i], 0),
                m: if bf16_m {
                    k.addr(&md16[i], 0)
                } else {
                    k.addr(&md32[i], 0)
                },
                v: if bf16_m {
                    k.addr(&vd16[i], 0)
                } else {
                    k.addr(&vd32[i], 0)
                },
                n: sizes[i] as i64,
            })
            .collect();
        let table = k.train_tensor_table(&tensors, bf16_m).unwrap();
        let sumsq = s.alloc_zeros::<f64>(1).unwrap();
        // SAFETY: every buffer the table names is live and sized; sumsq is one f64.
        unsafe {
            k.train_grad_sumsq_async(&table, k.addr(&sumsq, 0)).unwrap();
            k.train_adamw_async(&table, k.addr(&sumsq, 0), &sc, max_norm)
                .unwrap();
        }
        let got_sumsq = s.clone_dtoh(&sumsq).unwrap()[0];
        assert!(
            (got_sumsq - norm * norm).abs() <= 1e-5 * norm * norm,
            "{got_sumsq} vs {}",
            norm * norm
        );
        // The CPU step (ParamStore::adamw_step's clipping and AdamWScalars::update).
        let clip = if max_norm > 0.0 && norm as f32 > max_norm {
            max_norm / norm as f32
        } else {
            1.0
        };
        for i in 0..sizes.len() {
            let (gw, gm, gv) = if bf16_m {
                (
                    down(&s, &wd[i]),
                    down_bf16(&s, &md16[i]),
                    down_bf16(&s, &vd16[i]),
                )
            } else {
                (down(&s, &wd[i]), down(&s, &md32[i]), down(&s, &vd32[i]))
            };
            for e in 0..sizes[i] {
                let gg = if clip == 1.0 { g[i][e] } else { g[i][e] * clip };
                let (w2, m2, v2) = sc.update(w[i][e], gg, m[i][e], v[i][e]);
                // bf16 moments: stochastic rounding with the kernel's seeds and indices.
                let (m2, v2) = if bf16_m {
                    let sr = |x: f32, salt: u64| {
                        bf16::from_bits(f32_to_bf16_stochastic(
                            x,
                            sr_uniform(sc.sr_seed ^ salt, e as u64),
                        ))
                        .to_f32()
                    };
                    (sr(m2, MOMENT1_SR_SALT), sr(v2, MOMENT2_SR_SALT))
                } else {
                    (m2, v2)
                };
                if clip == 1.0 {
                    assert_eq!(
                        (gw[e], gm[e], gv[e]),
                        (w2, m2, v2),
                        "tensor {i} element {e} (bf16 moments {bf16_m})"
                    );
                } else {
                    // The clip factor comes from a differently ordered sum: equal to rounding.
                    assert!(
                        (gw[e] - w2).abs() <= 1e-6 * w2.abs().max(1e-3),
                        "tensor {i} element {e}: {} vs {w2}",
                        gw[e]
                    );
                    assert!((gm[e] - m2).abs() <= 1e-5 * m2.abs().max(1e-6));
                }
            }
        }
        eprintln!(
            "adamw clip {clip_frac} bf16 moments {bf16_m}: ok ({} chunks)",
            table.chunks()
        );
    }
    // A non-finite gradient changes nothing (the trainer then reports the divergence).
    let w = rand_vec(&mut r, 64, -1.0, 1.0);
    let mut g = rand_vec(&mut r, 64, -1.0, 1.0);
    g[5] = f32::NAN;
    let (wd, gd) = (up(&s, &w), up(&s, &g));
    let (md, vd) = (up(&s, &[0.0; 64]), up(&s, &[0.0; 64]));
    let table = k
        .train_tensor_table(
            &[TrainTensor {
                w: k.addr(&wd, 0),
                g: k.addr(&gd, 0),
                m: k.addr(&md, 0),
                v: k.addr(&vd, 0),
                n: 64,
            }],
            false,
        )
        .unwrap();
    let sumsq = s.alloc_zeros::<f64>(1).unwrap();
    // SAFETY: as above.
    unsafe {
        k.train_grad_sumsq_async(&table, k.addr(&sumsq, 0)).unwrap();
        k.train_adamw_async(&table, k.addr(&sumsq, 0), &sc, 1.0)
            .unwrap();
    }
    assert!(s.clone_dtoh(&sumsq).unwrap()[0].is_nan());
    assert_eq!(down(&s, &wd), w);
    assert_eq!(down(&s, &md), vec![0.0; 64]);
}

/// The train step's packed AdamW (GPU nvfp4-full) against the CPU: gradients scaled by the
/// clip factor from a device sum of squares, then `adamw_step_nvfp4`; bf16 moments widened and
/// stored back with stochastic rounding (element i drawing `sr_uniform(seed, i)`). Same bytes.
#[test]
#[ignore = "needs a CUDA GPU"]
fn packed_train_adamw_equals_the_cpu_step_bit_for_bit() {
    let k = gpu();
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(21);
    let (rows, cols) = (40, 96);
    let n = rows * cols;
    let w0 = Nvfp4Tensor::quantize(&rand_vec(&mut r, n, -1.0, 1.0), rows, cols).unwrap();
    let g = rand_vec(&mut r, n, -0.5, 0.5);
    let hp = AdamWParams {
        lr: 1e-2,
        ..AdamWParams::default()
    };
    for (bf16_moments, max_norm, lr0) in [
        (false, 1.0f32, false),
        (true, 0.0, false),
        (true, 1.0, true),
    ] {
        let hp = AdamWParams {
            lr: if lr0 { 0.0 } else { hp.lr },
            ..hp
        };
        let sumsq: f64 = 4.0 * g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        let (pseed, run_seed) = (0xABCD_u64, 0x1234_u64);
        let mut cpu_w = w0.clone();
        let m0 = rand_vec(&mut r, n, -0.01, 0.01);
        let v0 = rand_vec(&mut r, n, 0.0, 1e-4);
        let round = |x: &[f32]| -> Vec<f32> {
            if bf16_moments {
                x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
            } else {
                x.to_vec()
            }
        };
        let (mut m, mut v) = (round(&m0), round(&v0));
        let (m_start, v_start) = (m.clone(), v.clone());
        // CPU: clip, step, store the moments back.
        let norm = sumsq.sqrt() as f32;
        let gs: Vec<f32> = if max_norm > 0.0 && norm > max_norm {
            let f = max_norm / norm;
            g.iter().map(|&x| x * f).collect()
        } else {
            g.clone()
        };
        let step = 3;
        if lr0 {
            let sc = AdamWScalars::new(hp, step, pseed);
            for i in 0..n {
                (_, m[i], v[i]) = sc.update(0.0, gs[i], m[i], v[i]);
            }
        } else {
            kiln_kernels::cpu::adamw_step_nvfp4(
                &mut cpu_w, &gs, &mut m, &mut v, hp, step, 8, pseed,
            )
            .unwrap();
        }
        let ms = AdamWScalars::new(hp, step, run_seed).sr_seed;
        if bf16_moments {
            for (i, x) in m.iter_mut().enumerate() {
                *x = bf16::from_bits(f32_to_bf16_stochastic(
                    *x,
                    sr_uniform(ms ^ MOMENT1_SR_SALT, i as u64),
                ))
                .to_f32();
            }
            for (i, x) in v.iter_mut().enumerate() {
                *x = bf16::from_bits(f32_to_bf16_stochastic(
                    *x,
                    sr_uniform(ms ^ MOMENT2_SR_SALT, i as u64),
                ))
                .to_f32();
            }
        }
        // GPU.
        let mut dw = k.upload_nvfp4(&w0).unwrap();
        let dg = up(&s, &g);
        let dsum = s.clone_htod(&[sumsq]).unwrap();
        let mut status = k.alloc_status().unwrap();
        let (got_m, got_v) = if bf16_moments {
            let (dm, dv) = (up_bf16(&s, &m_start), up_bf16(&s, &v_start));
            unsafe {
                k.train_adamw_nvfp4_async(
                    &mut dw,
                    k.addr(&dg, 0),
                    (k.addr(&dm, 0), k.addr(&dv, 0)),
                    true,
                    &AdamWScalars::new(hp, step, pseed),
                    ms,
                    (k.addr(&dsum, 0), max_norm),
                    lr0,
                    &mut status,
                )
                .unwrap();
            }
            (down_bf16(&s, &dm), down_bf16(&s, &dv))
        } else {
            let (dm, dv) = (up(&s, &m_start), up(&s, &v_start));
            unsafe {
                k.train_adamw_nvfp4_async(
                    &mut dw,
                    k.addr(&dg, 0),
                    (k.addr(&dm, 0), k.addr(&dv, 0)),
                    false,
                    &AdamWScalars::new(hp, step, pseed),
                    ms,
                    (k.addr(&dsum, 0), max_norm),
                    lr0,
                    &mut status,
                )
                .unwrap();
            }
            (down(&s, &dm), down(&s, &dv))
        };
        let got_w = k.download_nvfp4(&dw).unwrap();
        let what = format!("bf16 moments {bf16_moments}, clip {max_norm}, lr 0 {lr0}");
        assert_eq!(got_w, cpu_w, "{what}: weights");
        assert!(
            got_m
                .iter()
                .zip(&m)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: m"
        );
        assert!(
            got_v
                .iter()
                .zip(&v)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: v"
        );
        if lr0 {
            assert_eq!(got_w, w0, "{what}: lr 0 moved the weights");
        } else {
            assert_ne!(got_w, w0, "{what}: the step changed nothing");
        }
        eprintln!("packed train AdamW ({what}): bit-identical to the CPU");
    }
}

// The flash train attention (attention_train.cu): forward output and log-sum-exp, dq / dk / dv
// against an f64 reference over head dims 32 / 64 / 128, GQA groups of 1 to 7, sequences that
// are not multiples of the 64-key tiles (and of one token), several sequences a batch.

/// `n` uniform values in `[-a, a)`, rounded to bf16 (so the GPU and the reference read the
/// same inputs).
fn bf16_values(r: &mut ChaCha8Rng, n: usize, a: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(r.random_range(-a..a)).to_f32())
        .collect()
}

/// The reference: output (tokens `[N][nh·hd]`), log-sum-exp in log2 (`[B][nh][T]`), and the
/// gradients dq (`[B][nh][T][hd]`), dk, dv (`[B][kvh][T][hd]`) for the output gradient `dout`
/// (tokens).
struct FlashReference {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn flash_reference(
    sh: TrainAttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
) -> FlashReference {
    let (b_n, t_n, nh, kvh, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let rep = nh / kvh;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut r = FlashReference {
        out: vec![0.0; b_n * t_n * nh * hd],
        lse: vec![0.0; b_n * nh * t_n],
        dq: vec![0.0; b_n * nh * t_n * hd],
        dk: vec![0.0; b_n * kvh * t_n * hd],
        dv: vec![0.0; b_n * kvh * t_n * hd],
    };
    for b in 0..b_n {
        for h in 0..nh {
            let g = h / rep;
            let qi = |t: usize, c: usize| q[((b * nh + h) * t_n + t) * hd + c] as f64;
            let kv = |t: usize| ((b * kvh + g) * t_n + t) * hd;
            let tok = |t: usize| ((b * t_n + t) * nh + h) * hd;
            for t in 0..t_n {
                let s: Vec<f64> = (0..=t)
                    .map(|j| scale * (0..hd).map(|c| qi(t, c) * k[kv(j) + c] as f64).sum::<f64>())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / sum).collect();
                r.lse[(b * nh + h) * t_n + t] = (m + sum.ln()) / std::f64::consts::LN_2;
                let o: Vec<f64> = (0..hd)
                    .map(|c| (0..=t).map(|j| p[j] * v[kv(j) + c] as f64).sum())
                    .collect();
                r.out[tok(t)..tok(t) + hd].copy_from_slice(&o);
                let d_o: Vec<f64> = (0..hd).map(|c| dout[tok(t) + c] as f64).collect();
                let dd: f64 = (0..hd).map(|c| d_o[c] * o[c]).sum();
                for j in 0..=t {
                    let dp: f64 = (0..hd).map(|c| d_o[c] * v[kv(j) + c] as f64).sum();
                    let ds = scale * p[j] * (dp - dd);
                    for c in 0..hd {
                        r.dv[kv(j) + c] += p[j] * d_o[c];
                        r.dq[((b * nh + h) * t_n + t) * hd + c] += ds * k[kv(j) + c] as f64;
                        r.dk[kv(j) + c] += ds * qi(t, c);
                    }
                }
            }
        }
    }
    r
}

fn check_flash_shape(k: &CudaKernels, sh: TrainAttnShape, seed: u64) {
    let s = k.stream().clone();
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let (n, nh, kvh, hd) = (sh.tokens(), sh.heads, sh.kv_heads, sh.head_dim);
    let q = bf16_values(&mut r, n * nh * hd, 2.0);
    let kk = bf16_values(&mut r, n * kvh * hd, 2.0);
    let v = bf16_values(&mut r, n * kvh * hd, 1.0);
    let dout: Vec<f32> = (0..n * nh * hd)
        .map(|_| r.random_range(-1.0f32..1.0))
        .collect();
    // dO in the group layout, bf16 (what the split-heads kernel makes)
    let mut dout_g = vec![0f32; dout.len()];
    for b in 0..sh.batch {
        for t in 0..sh.seq {
            for h in 0..nh {
                let (src, dst) = (
                    ((b * sh.seq + t) * nh + h) * hd,
                    ((b * nh + h) * sh.seq + t) * hd,
                );
                dout_g[dst..dst + hd].copy_from_slice(&dout[src..src + hd]);
            }
        }
    }
    let want = flash_reference(sh, &q, &kk, &v, &dout);
    let (qd, kd, vd) = (up_bf16(&s, &q), up_bf16(&s, &kk), up_bf16(&s, &v));
    let out = s.alloc_zeros::<bf16>(n * nh * hd).unwrap();
    let lse = s.alloc_zeros::<f32>(sh.batch * nh * sh.seq).unwrap();
    let dd = s.alloc_zeros::<f32>(sh.batch * nh * sh.seq).unwrap();
    let dout_gd = up_bf16(&s, &dout_g);
    // dq starts as garbage: the launcher zeroes it
    let dq = s.clone_htod(&vec![7.0f32; n * nh * hd]).unwrap();
    let dk = s.alloc_zeros::<f32>(n * kvh * hd).unwrap();
    let dv = s.alloc_zeros::<f32>(n * kvh * hd).unwrap();
    let a = |d: &CudaSlice<bf16>| k.addr(d, 0);
    let f = |d: &CudaSlice<f32>| k.addr(d, 0);
    // SAFETY: every buffer is sized as the launchers' contracts say.
    unsafe {
        k.train_flash_attn_fwd_async(sh, (a(&qd), a(&kd), a(&vd)), a(&out), f(&lse))
            .unwrap();
        k.train_flash_attn_bwd_async(
            sh,
            (a(&qd), a(&kd), a(&vd)),
            (a(&out), f(&lse)),
            a(&dout_gd),
            f(&dd),
            (f(&dq), f(&dk), f(&dv)),
        )
        .unwrap();
    }
    s.synchronize().unwrap();
    let what = format!("{sh:?}");
    // P is rounded to bf16 before P·V and the output to bf16: ~2^-8 relative
    assert_f32_close(
        &format!("{what} out"),
        &down_bf16(&s, &out),
        &want.out,
        1e-2,
    );
    assert_f32_close(
        &format!("{what} lse"),
        &s.clone_dtoh(&lse).unwrap(),
        &want.lse,
        1e-4,
    );
    // the backward also rounds dS to bf16 and reads dO in bf16
    for (name, got, want) in [
        ("dq", &dq, &want.dq),
        ("dk", &dk, &want.dk),
        ("dv", &dv, &want.dv),
    ] {
        assert_f32_close(
            &format!("{what} {name}"),
            &s.clone_dtoh(got).unwrap(),
            want,
            2e-2,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn flash_train_attention_forward_and_backward_match_the_f64_reference() {
    let k = gpu();
    let shape = |batch, seq, heads, kv_heads, head_dim| TrainAttnShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
    };
    for (i, sh) in [
        shape(2, 70, 4, 2, 64),
        shape(1, 200, 7, 1, 128),
        shape(3, 33, 2, 2, 32),
        shape(1, 1, 2, 1, 64),
        shape(2, 129, 14, 2, 64),
        shape(1, 64, 4, 4, 128),
    ]
    .into_iter()
    .enumerate()
    {
        check_flash_shape(&k, sh, 100 + i as u64);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_head_dim_without_a_flash_kernel_is_refused() {
    let k = gpu();
    let sh = TrainAttnShape {
        batch: 1,
        seq: 8,
        heads: 2,
        kv_heads: 1,
        head_dim: 256,
    };
    // SAFETY: refused before anything is queued (no buffer is touched).
    let e = unsafe { k.train_flash_attn_fwd_async(sh, (0, 0, 0), 0, 0) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("head dims") && e.contains("256"), "{e}");
}
