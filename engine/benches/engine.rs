//! `cargo bench -p kiln-engine --bench engine`: the engine benchmark (the same function the
//! CLI exposes as `kiln bench engine`). Arguments: `--quick` (tiny model only), or
//! `PROMPT TINY_NEW BIG_NEW TURN_NEW` token counts.

use kiln_engine::generate::bench::{run_engine_bench, BenchOptions};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut opts = BenchOptions::default();
    if args.iter().any(|a| a == "--quick") {
        opts.big_new_tokens = 0;
    } else if args.len() >= 4 {
        let n: Vec<usize> = args[..4]
            .iter()
            .map(|a| a.parse().expect("token counts"))
            .collect();
        opts = BenchOptions {
            prompt_tokens: n[0],
            tiny_new_tokens: n[1],
            big_new_tokens: n[2],
            turn_new_tokens: n[3],
        };
    }
    let t = std::time::Instant::now();
    let r = run_engine_bench(&opts, &mut |m| {
        eprintln!("[{:>6.1}s] {m}", t.elapsed().as_secs_f64())
    })
    .expect("benchmark failed");
    println!("{}", r.to_table());
}
