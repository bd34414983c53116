//! The chunked AdamW step on packed weights: equal to an unchunked step, close to a dense f32
//! AdamW step, and its scratch memory is bounded by the chunk — measured here with a counting
//! global allocator, not just reported.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_kernels::cpu::{adamw_step_nvfp4, AdamWParams, AdamWScalars};
use kiln_kernels::Nvfp4Tensor;

/// Counts live heap bytes and their peak since the last reset.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn weights(rows: usize, cols: usize, salt: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| (((i + salt) as f32 * 0.7548777).fract() - 0.5) * 0.2)
        .collect()
}

/// Extra heap bytes at the peak of one step, over what was live before it.
fn measured_step_peak(rows: usize, cols: usize, chunk: usize) -> (usize, usize) {
    let mut w = Nvfp4Tensor::quantize(&weights(rows, cols, 0), rows, cols).unwrap();
    let g = weights(rows, cols, 17);
    let (mut m, mut v) = (vec![0.0f32; rows * cols], vec![0.0f32; rows * cols]);
    let hp = AdamWParams::default();
    // warm the rayon pool so its one-time allocations are not counted
    adamw_step_nvfp4(&mut w, &g, &mut m, &mut v, hp, 1, chunk, 1).unwrap();
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let stats = adamw_step_nvfp4(&mut w, &g, &mut m, &mut v, hp, 2, chunk, 1).unwrap();
    (PEAK.load(Ordering::SeqCst) - before, stats.peak_temp_bytes)
}

#[test]
fn step_scratch_is_bounded_by_the_chunk_not_the_tensor() {
    let (rows, cols) = (4096, 256);
    let full_f32 = rows * cols * 4; // 4 MiB: what an unchunked dequantize would need
    for chunk in [8usize, 32, 128] {
        let (measured, reported) = measured_step_peak(rows, cols, chunk);
        assert_eq!(reported, chunk * cols * 4);
        // the chunk buffer plus a little for the thread pool's bookkeeping
        assert!(
            measured <= reported + 64 * 1024,
            "chunk {chunk}: measured {measured} B, reported {reported} B"
        );
        assert!(
            measured >= reported,
            "chunk {chunk}: measured {measured} < buffer {reported}"
        );
        assert!(
            measured * 8 < full_f32,
            "chunk {chunk}: {measured} B is not small next to {full_f32} B"
        );
        eprintln!("chunk_rows {chunk:>3}: peak scratch {measured} B (buffer {reported} B; whole tensor in f32 {full_f32} B)");
    }
    // Doubling the tensor's rows leaves the scratch unchanged.
    let (a, _) = measured_step_peak(2048, 256, 32);
    let (b, _) = measured_step_peak(4096, 256, 32);
    assert!(
        b <= a + 16 * 1024,
        "scratch grew with the tensor: {a} → {b}"
    );
}

#[test]
fn packed_step_tracks_a_dense_adamw_step_in_expectation() {
    let (rows, cols) = (16, 64);
    let w0 = Nvfp4Tensor::quantize(&weights(rows, cols, 3), rows, cols).unwrap();
    let start = w0.dequantize();
    let g = weights(rows, cols, 99);
    let hp = AdamWParams {
        lr: 2e-3,
        ..AdamWParams::default()
    };
    // dense reference from the same dequantized start
    let sc = AdamWScalars::new(hp, 1, 0);
    let dense: Vec<f32> = start
        .iter()
        .zip(&g)
        .map(|(&w, &gr)| sc.update(w, gr, 0.0, 0.0).0)
        .collect();
    let draws = 300;
    let mut mean = vec![0.0f64; rows * cols];
    for seed in 0..draws {
        let mut w = w0.clone();
        let (mut m, mut v) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
        adamw_step_nvfp4(&mut w, &g, &mut m, &mut v, hp, 1, 4, seed).unwrap();
        for (acc, d) in mean.iter_mut().zip(w.dequantize()) {
            *acc += d as f64 / draws as f64;
        }
    }
    let step = |a: &[f64]| -> f64 {
        a.iter()
            .zip(&dense)
            .map(|(x, &d)| (x - d as f64).abs())
            .sum::<f64>()
            / a.len() as f64
    };
    let err_mean = step(&mean);
    let moved: f64 = start
        .iter()
        .zip(&dense)
        .map(|(&s, &d)| (s - d).abs() as f64)
        .sum::<f64>()
        / dense.len() as f64;
    // The update (≈ lr per element) is far below the grid step, yet in expectation the packed
    // weights move by it: the leftover error is a fraction of the update itself.
    assert!(
        err_mean < 0.25 * moved,
        "mean error {err_mean:e} vs update size {moved:e}"
    );
}
