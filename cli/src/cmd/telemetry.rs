//! `kiln telemetry ID`: a job's phase samples (and with --guard the guard's time series) as a
//! table, JSON or CSV, and with --plot a chart of memory over time (PNG or SVG).

use super::print_json;
use crate::args::{OutputFormat, TelemetryArgs};
use crate::client::{connect, status_error};
use crate::output::{telemetry_csv, telemetry_json, telemetry_table};
use anyhow::{bail, Context};
use kiln_proto::v1::{self, TelemetrySource};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::process::ExitCode;

/// `kiln telemetry`.
pub async fn run(args: TelemetryArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.client).await?;
    // Fail with NOT_FOUND for an unknown job rather than printing an empty table.
    let job = client
        .get_job(v1::GetJobRequest { id: args.id })
        .await
        .map_err(status_error)?
        .into_inner();
    let rows = client
        .query_telemetry(v1::QueryTelemetryRequest {
            job_id: args.id,
            phase: args.phase.clone().unwrap_or_default(),
            include_guard: args.guard || args.plot.is_some(),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .rows;
    if let Some(path) = &args.plot {
        plot(path, &job, &rows)?;
        eprintln!("wrote {}", path.display());
    }
    match args.client.output {
        OutputFormat::Table => println!("{}", telemetry_table(&rows)),
        OutputFormat::Json => print_json(&serde_json::Value::Array(
            rows.iter().map(telemetry_json).collect(),
        )),
        OutputFormat::Csv => print!("{}", telemetry_csv(&rows)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The font every chart uses, bundled so plotting needs no system fonts (DejaVu Sans; its
/// license is in cli/assets/DejaVuSans.LICENSE).
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Registering a valid bundled TrueType font cannot fail.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws the job's memory (MiB) over time (seconds from the first sample): the guard's series
/// as a line, phase samples as labelled points, the budget as a horizontal line.
pub fn plot(path: &Path, job: &v1::Job, rows: &[v1::TelemetryRow]) -> anyhow::Result<()> {
    if rows.is_empty() {
        bail!("job {} has no telemetry yet; nothing to plot", job.id);
    }
    register_font();
    let is_svg = match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => true,
        Some("png") => false,
        _ => bail!("--plot {}: use a .png or .svg file name", path.display()),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot write {}: no such directory {} (create it first)",
            path.display(),
            dir.display()
        );
    }
    let t0 = rows
        .iter()
        .filter_map(|r| r.sample.as_ref())
        .map(|s| s.at_ms)
        .min()
        .unwrap_or(0);
    let point = |r: &v1::TelemetryRow| {
        let s = r.sample.clone().unwrap_or_default();
        (
            (s.at_ms.saturating_sub(t0)) as f64 / 1000.0,
            s.pid_mem as f64 / (1u64 << 20) as f64,
            s.phase,
        )
    };
    let guard: Vec<_> = rows
        .iter()
        .filter(|r| r.source == TelemetrySource::Guard as i32)
        .map(point)
        .collect();
    let phases: Vec<_> = rows
        .iter()
        .filter(|r| r.source == TelemetrySource::Phase as i32)
        .map(point)
        .collect();
    let budget_mib =
        job.resources.as_ref().map(|r| r.budget_bytes).unwrap_or(0) as f64 / (1u64 << 20) as f64;
    // Where the guard killed the job: the moment and the memory it saw.
    let kill = job.kill.as_ref().map(|k| {
        (
            k.at_ms.saturating_sub(t0) as f64 / 1000.0,
            k.pid_mem as f64 / (1u64 << 20) as f64,
        )
    });
    let t_max = guard
        .iter()
        .chain(&phases)
        .map(|p| p.0)
        .chain(kill.map(|k| k.0))
        .fold(0.0, f64::max)
        .max(1.0);
    let data_max = guard
        .iter()
        .chain(&phases)
        .map(|p| p.1)
        .chain(kill.map(|k| k.1))
        .fold(0.0, f64::max)
        .max(1.0);
    // Draw the budget line only when it is on the data's scale; a budget far above the job's
    // use would flatten the curve into the axis.
    let budget_on_scale = budget_mib <= data_max * 3.0;
    let m_max = if budget_on_scale {
        data_max.max(budget_mib)
    } else {
        data_max
    } * 1.15;
    let chart = Chart {
        title: format!(
            "job {} memory (budget {:.0} MiB{})",
            job.id,
            budget_mib,
            if budget_on_scale { "" } else { ", off scale" }
        ),
        budget_on_scale,
        guard,
        phases,
        budget_mib,
        kill,
        t_max,
        m_max,
    };
    if is_svg {
        chart.draw(SVGBackend::new(path, (1000, 600)).into_drawing_area())
    } else {
        chart.draw(BitMapBackend::new(path, (1000, 600)).into_drawing_area())
    }
    .with_context(|| format!("drawing {}", path.display()))
}

/// What `plot` draws, independent of the backend.
struct Chart {
    title: String,
    /// (seconds, MiB, phase) of guard polls.
    guard: Vec<(f64, f64, String)>,
    /// (seconds, MiB, phase) of phase samples.
    phases: Vec<(f64, f64, String)>,
    budget_mib: f64,
    budget_on_scale: bool,
    /// (seconds, MiB) where the guard killed the job.
    kill: Option<(f64, f64)>,
    t_max: f64,
    m_max: f64,
}

impl Chart {
    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, plotters::coord::Shift>,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let x_end = self.t_max * 1.02;
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_end, 0.0..self.m_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("MiB (job processes)")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                self.guard.iter().map(|p| (p.0, p.1)),
                &BLUE,
            ))?
            .label("guard samples")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if self.budget_on_scale {
            chart
                .draw_series(LineSeries::new(
                    vec![(0.0, self.budget_mib), (x_end, self.budget_mib)],
                    &RED,
                ))?
                .label("budget")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
        chart
            .draw_series(
                self.phases
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 4, GREEN.filled())),
            )?
            .label("phase samples")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, GREEN.filled()));
        // Name the phases when there are few enough to read; long runs show points only.
        // Labels of points in the right fifth end at their point, so none runs off the edge.
        let label = |text: String, at: (f64, f64), size: u32| {
            let anchor = if at.0 > x_end * 0.8 {
                Pos::new(HPos::Right, VPos::Bottom)
            } else {
                Pos::new(HPos::Left, VPos::Bottom)
            };
            Text::new(
                text,
                at,
                TextStyle::from(("sans-serif", size).into_font()).pos(anchor),
            )
        };
        if self.phases.len() <= 16 {
            chart.draw_series(
                self.phases
                    .iter()
                    .map(|p| label(p.2.clone(), (p.0, p.1), 12)),
            )?;
        }
        if let Some(k) = self.kill {
            chart
                .draw_series([Cross::new(k, 8, RED.stroke_width(3))])?
                .label("guard kill")
                .legend(|(x, y)| Cross::new((x + 10, y), 5, RED.stroke_width(2)));
            chart.draw_series([label("KILLED".into(), k, 14)])?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
