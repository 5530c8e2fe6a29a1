//! SVG plots of a comparison run (plotters, SVG backend, no system fonts needed): per workload, a
//! bar chart of throughput per system (median bar, min–max whisker over rounds) and the latency
//! distribution per system (percentile spectrum: latency against "number of nines", from the HDR
//! histograms of all rounds merged). It owns drawing only; the numbers come from the rows of
//! `raw.jsonl`. Invariant: a plot shows only measured data — a system without a histogram (a run
//! that failed) is left out of the latency plot, not drawn as zero.

use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::compare::report::median;
use crate::compare::systems::System;
use crate::compare::{Row, Workload};
use crate::stats::{decode_histogram, new_histogram};

/// Pixel size of every plot.
const PLOT_SIZE: (u32, u32) = (1000, 560);
/// Highest percentile drawn, as nines (4 = 99.99%).
const NINES_MAX: f64 = 4.0;
/// Points per latency curve.
const CURVE_POINTS: usize = 200;

/// One latency curve: colour index, system, (nines, milliseconds) points.
type Curve = (usize, System, Vec<(f64, f64)>);

/// Why a plot could not be drawn.
pub type PlotError = Box<dyn std::error::Error>;

fn color(index: usize) -> RGBColor {
    // Distinct, print-friendly colours; geobeat is always first (dark blue), null second.
    const COLORS: [RGBColor; 7] = [
        RGBColor(31, 119, 180),
        RGBColor(127, 127, 127),
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(23, 190, 207),
        RGBColor(148, 103, 189),
    ];
    COLORS[index % COLORS.len()]
}

/// Draws every plot of a run into `dir`; returns the files written.
pub fn draw_all(
    dir: &Path,
    rows: &[Row],
    workloads: &[Workload],
    systems: &[System],
) -> Result<Vec<PathBuf>, PlotError> {
    let mut written = Vec::new();
    for workload in workloads {
        let present: Vec<System> = systems
            .iter()
            .copied()
            .filter(|s| {
                rows.iter()
                    .any(|r| r.workload == workload.name && r.system == s.name())
            })
            .collect();
        if present.is_empty() {
            continue;
        }
        let path = dir.join(format!("throughput-{}.svg", workload.name));
        throughput_plot(&path, rows, workload, &present)?;
        written.push(path);
        let path = dir.join(format!("latency-{}.svg", workload.name));
        if latency_plot(&path, rows, workload, &present)? {
            written.push(path);
        }
    }
    Ok(written)
}

fn throughput_plot(
    path: &Path,
    rows: &[Row],
    workload: &Workload,
    systems: &[System],
) -> Result<(), PlotError> {
    let stats: Vec<(System, f64, f64, f64)> = systems
        .iter()
        .map(|&s| {
            let values: Vec<f64> = rows
                .iter()
                .filter(|r| r.workload == workload.name && r.system == s.name())
                .map(|r| r.throughput_per_s)
                .collect();
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(0.0, f64::max);
            (s, median(&values), min, max)
        })
        .collect();
    let top = stats.iter().map(|s| s.3).fold(1.0, f64::max) * 1.15;
    let root = SVGBackend::new(path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Acked heartbeats/s — {}", workload.title),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(90)
        // A segmented range a..b has b - a + 1 segments: one per system.
        .build_cartesian_2d(
            (0..stats.len().saturating_sub(1)).into_segmented(),
            0.0..top,
        )?;
    let labels: Vec<&str> = stats.iter().map(|s| s.0.name()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("heartbeats/s (median; whisker: min–max over rounds)")
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i).copied().unwrap_or("").to_owned(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()?;
    for (i, (_, med, min, max)) in stats.iter().enumerate() {
        let c = color(i);
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *med),
            ],
            c.mix(0.75).filled(),
        );
        bar.set_margin(0, 0, 12, 12);
        chart.draw_series(std::iter::once(bar))?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![
                (SegmentValue::CenterOf(i), *min),
                (SegmentValue::CenterOf(i), *max),
            ],
            BLACK.stroke_width(2),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{:.0}", med),
            (SegmentValue::CenterOf(i), *max + top * 0.02),
            ("sans-serif", 14).into_font(),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// The merged latency histogram of every round of `system` on `workload`.
fn merged_histogram(rows: &[Row], workload: &str, system: System) -> Option<Histogram<u64>> {
    let mut merged = new_histogram();
    let mut any = false;
    for row in rows
        .iter()
        .filter(|r| r.workload == workload && r.system == system.name())
    {
        let Some(encoded) = row
            .summary
            .as_ref()
            .and_then(|s| s.histogram_v2_base64.as_deref())
        else {
            continue;
        };
        if let Ok(h) = decode_histogram(encoded) {
            if merged.add(&h).is_ok() && !h.is_empty() {
                any = true;
            }
        }
    }
    any.then_some(merged)
}

fn latency_plot(
    path: &Path,
    rows: &[Row],
    workload: &Workload,
    systems: &[System],
) -> Result<bool, PlotError> {
    let curves: Vec<Curve> = systems
        .iter()
        .enumerate()
        .filter_map(|(i, &s)| {
            let h = merged_histogram(rows, &workload.name, s)?;
            let points = (0..=CURVE_POINTS)
                .map(|k| {
                    let nines = NINES_MAX * k as f64 / CURVE_POINTS as f64;
                    let q = 1.0 - 10f64.powf(-nines);
                    (nines, h.value_at_quantile(q).max(1) as f64 / 1000.0)
                })
                .collect();
            Some((i, s, points))
        })
        .collect();
    if curves.is_empty() {
        return Ok(false);
    }
    let all = curves.iter().flat_map(|c| c.2.iter().map(|p| p.1));
    let (lo, hi) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let root = SVGBackend::new(path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Ack latency distribution — {}", workload.title),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            0.0..NINES_MAX,
            ((lo * 0.8).max(0.001)..hi * 1.25).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency, ms (log)")
        .x_labels(5)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            4 => "99.99%".into(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| {
            if *y >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .draw()?;
    for (i, system, points) in curves {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))?
            .label(system.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{encode_histogram, Summary};

    #[test]
    fn plots_are_written_from_rows() {
        // Checks that a throughput and a latency SVG are written for a workload with two
        // systems (one with a histogram, one without) and that the latency plot leaves the
        // histogram-less system out.
        let dir = std::env::temp_dir().join(format!("geobeat-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut h = new_histogram();
        for v in [100u64, 200, 300, 5_000] {
            h.record(v).unwrap();
        }
        let summary = Summary {
            histogram_v2_base64: Some(encode_histogram(&h)),
            ..Summary::default()
        };
        let workload = crate::compare::full_workloads()[0].clone();
        let rows = vec![
            Row {
                round: 1,
                workload: workload.name.clone(),
                system: "geobeat".into(),
                throughput_per_s: 1000.0,
                summary: Some(summary),
                ..Row::default()
            },
            Row {
                round: 1,
                workload: workload.name.clone(),
                system: "null".into(),
                throughput_per_s: 1200.0,
                ..Row::default()
            },
        ];
        let written = draw_all(
            &dir,
            &rows,
            &[workload],
            &[System::Geobeat, System::Null, System::Mosquitto],
        )
        .unwrap();
        assert_eq!(written.len(), 2);
        let latency = std::fs::read_to_string(&written[1]).unwrap();
        assert!(latency.contains("geobeat"));
        assert!(!latency.contains(">null<"));
        let bars = std::fs::read_to_string(&written[0]).unwrap();
        assert!(bars.contains("null") && !bars.contains("mosquitto"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
