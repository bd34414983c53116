//! `kiln random-model`: a random-weight model of a named shape written as a model directory.
//! Thin: the work is `kiln_engine::shapes::write_random_model`.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_engine::model::SaveFormat;
use kiln_engine::shapes::write_random_model;

use crate::args::{RandomModelArgs, RandomModelFormat};
use crate::output::bytes;

/// Run `kiln random-model` (blocking).
pub fn run(args: RandomModelArgs) -> anyhow::Result<()> {
    let format = match args.format {
        RandomModelFormat::Bf16 => SaveFormat::Dense,
        RandomModelFormat::ModelOpt => SaveFormat::Nvfp4ModelOpt,
        RandomModelFormat::CompressedTensors => SaveFormat::Nvfp4CompressedTensors,
    };
    // Minutes for the large shapes: a spinner with the elapsed time while it works.
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("valid template"),
    );
    spinner.set_message(format!(
        "drawing the {} weights (seed {}) and writing them to {}",
        args.shape,
        args.seed,
        args.out.display()
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let s = write_random_model(&args.shape, &args.out, format, args.seed);
    spinner.finish_and_clear();
    let s = s.with_context(|| format!("writing a random {} model", args.shape))?;
    let params = if s.params >= 1_000_000_000 {
        format!("{:.2} B", s.params as f64 / 1e9)
    } else {
        format!("{:.2} M", s.params as f64 / 1e6)
    };
    println!(
        "{}: {params} parameters, {} in {} files written to {} (weights drawn in {:.1} s, written in {:.1} s)",
        args.shape,
        bytes(s.bytes),
        s.files.len(),
        args.out.display(),
        s.build_s,
        s.write_s
    );
    Ok(())
}
