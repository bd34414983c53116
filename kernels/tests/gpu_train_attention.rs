//! GPU tests of the train step's flash attention (`attention_train.cu`) against an f64 CPU
//! reference: the forward's output and log-sum-exp, and the backward's dq, dk, dv, over head
//! dims 32 / 64 / 128, GQA groups of 1 to 7 query heads, sequences that are not multiples of
//! the 64-key tiles (and of one token), several sequences a batch. Ignored without a GPU
//! (`cargo test -p kiln-kernels --test gpu_train_attention -- --ignored` on a GPU machine).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use kiln_kernels::cuda::train::TrainAttnShape;
use kiln_kernels::cuda::CudaKernels;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu() -> CudaKernels {
    CudaKernels::new(0).unwrap_or_else(|e| panic!("GPU test run where CUDA is not usable: {e}"))
}

/// `n` uniform values in `[-a, a)`, rounded to bf16 (so the GPU and the reference read the
/// same inputs).
fn bf16_values(r: &mut ChaCha8Rng, n: usize, a: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(r.random_range(-a..a)).to_f32())
        .collect()
}

fn up_bf16(s: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<bf16> {
    let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    s.clone_htod(&b).unwrap()
}

fn down_bf16(s: &Arc<CudaStream>, d: &CudaSlice<bf16>) -> Vec<f32> {
    s.clone_dtoh(d)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect()
}

/// The largest |got − want| over the largest |want| (at least 1) must be at most `rel`.
fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64) {
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

/// The reference: output (tokens `[N][nh·hd]`), log-sum-exp in log2 (`[B][nh][T]`), and the
/// gradients dq (`[B][nh][T][hd]`), dk, dv (`[B][kvh][T][hd]`) for the output gradient `dout`
/// (tokens).
struct Reference {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn reference(sh: TrainAttnShape, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> Reference {
    let (b_n, t_n, nh, kvh, hd) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let rep = nh / kvh;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut r = Reference {
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

fn check_shape(k: &CudaKernels, sh: TrainAttnShape, seed: u64) {
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
    let want = reference(sh, &q, &kk, &v, &dout);
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
    assert_close(
        &format!("{what} out"),
        &down_bf16(&s, &out),
        &want.out,
        1e-2,
    );
    assert_close(
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
        assert_close(
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
        check_shape(&k, sh, 100 + i as u64);
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
