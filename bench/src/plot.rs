//! PNG plots of a report (plotters, text in `DejaVu` Sans from Debian's `fonts-dejavu-core`).
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::{
    cluster::Path4,
    report::{Report, Sample},
};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    let bytes = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (apt-get install fonts-dejavu-core)"))?;
    // The font must live for the program's life; the bench registers it once.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("registering {FONT}"))?;
    Ok(())
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0, 0, 0),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

/// Request rate and new-connection rate against the number of services, one line per path.
pub fn rates(report: &Report, out: &Path) -> Result<()> {
    type Pick = fn(&Sample) -> f64;
    register_font()?;
    let root = BitMapBackend::new(out, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let panels: [(&DrawingArea<_, _>, &str, Pick); 2] = [
        (
            &left,
            "request/response over persistent connections (req/s)",
            |s| s.rr_rate,
        ),
        (&right, "new connections per second (conn/s)", |s| {
            s.crr_rate
        }),
    ];
    for (area, title, pick) in panels {
        let series = report.series(&pick);
        let max_y = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(1.0, f64::max)
            * 1.15;
        let max_x = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(n, _)| *n))
            .max()
            .unwrap_or(1)
            .max(10);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1f64..max_x as f64 * 2.0).log_scale(), 0f64..max_y)?;
        chart
            .configure_mesh()
            .x_desc("services (log scale)")
            .y_desc(title.split('(').next().unwrap_or(""))
            .draw()?;
        for (path, points) in &series {
            // One colour per path, whichever paths a run measured.
            let color =
                COLORS[Path4::ALL.iter().position(|p| p == path).unwrap_or(0) % COLORS.len()];
            let pts: Vec<(f64, f64)> = points.iter().map(|(n, y)| (*n as f64, *y)).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(path.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present().context("writing the plot")?;
    Ok(())
}
