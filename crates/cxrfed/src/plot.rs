//! `cxrfed stats --plot FILE.png`: a stacked bar chart of a crosstab (the seed's "image quality
//! vs analysis confidence" chart) or a bar chart of a histogram, drawn with plotters. The font
//! (DejaVu Sans, `assets/fonts`, its licence next to it) is built into the binary, so charts
//! render the same on a server without fonts.

use std::path::Path;

use anyhow::{Context, bail};
use cxrfed_proto::v1 as pb;
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

fn value(cell: &pb::StatsCell) -> f64 {
    use pb::stats_cell::Value;
    match &cell.value {
        Some(Value::Count(n)) => *n as f64,
        Some(Value::Number(x)) => *x,
        _ => 0.0,
    }
}

fn text(cell: &pb::StatsCell) -> String {
    use pb::stats_cell::Value;
    match &cell.value {
        Some(Value::Text(t)) => t.clone(),
        Some(Value::Count(n)) => n.to_string(),
        Some(Value::Number(x)) => format!("{x}"),
        None => String::new(),
    }
}

/// A bar chart: one bar per label, stacked by `stacks` (`values[bar][stack]`).
pub struct Bars {
    pub labels: Vec<String>,
    pub stacks: Vec<String>,
    pub values: Vec<Vec<f64>>,
    pub x_title: String,
    pub y_title: String,
}

/// Draws `response` (a crosstab or histogram) into a PNG at `path`.
pub fn draw(response: &pb::StatsResponse, query: &str, path: &Path) -> anyhow::Result<()> {
    let bars = bars(response, query)?;
    register_font()?;
    render(
        BitMapBackend::new(path, (960, 560)).into_drawing_area(),
        &bars,
        query,
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

/// The same chart as SVG text (the console embeds it).
pub fn svg(bars: &Bars, caption: &str) -> anyhow::Result<String> {
    register_font()?;
    let mut out = String::new();
    render(
        SVGBackend::with_string(&mut out, (960, 560)).into_drawing_area(),
        bars,
        caption,
    )?;
    Ok(out)
}

/// Text is measured with the built-in font (SVG text too), so it must be registered first.
pub fn register_font() -> anyhow::Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the built-in font does not load"))
}

/// A crosstab or histogram laid out as bars.
pub fn bars(response: &pb::StatsResponse, query: &str) -> anyhow::Result<Bars> {
    // Bars: one per row; stacks: the value columns.
    let (labels, stacks, values, x_title, y_title): (
        Vec<String>,
        Vec<String>,
        Vec<Vec<f64>>,
        String,
        String,
    ) = match response.statistic.as_str() {
        "crosstab" => {
            // Leading text columns label the bar; `field=value` columns stack; `total` is left out.
            let keys = response
                .columns
                .iter()
                .take_while(|c| !c.contains('='))
                .count();
            if keys == 0 || keys >= response.columns.len() {
                bail!("--plot needs a crosstab laid out as `field=value` columns");
            }
            let stack_columns: Vec<usize> = (keys..response.columns.len())
                .filter(|&i| response.columns[i] != "total")
                .collect();
            let labels = response
                .rows
                .iter()
                .map(|r| {
                    r.cells[..keys]
                        .iter()
                        .map(text)
                        .collect::<Vec<_>>()
                        .join(" / ")
                })
                .collect();
            let stacks = stack_columns
                .iter()
                .map(|&i| {
                    let c = &response.columns[i];
                    c.split_once('=').map_or(c.clone(), |(_, v)| v.to_string())
                })
                .collect();
            let values = response
                .rows
                .iter()
                .map(|r| stack_columns.iter().map(|&i| value(&r.cells[i])).collect())
                .collect();
            let across = response.columns[keys]
                .split_once('=')
                .map_or(String::new(), |(f, _)| f.to_string());
            (
                labels,
                stacks,
                values,
                response.columns[..keys].join(" / "),
                if query.contains("normalize") {
                    format!("share ({across})")
                } else {
                    format!("records ({across})")
                },
            )
        }
        "histogram" if response.columns.len() == 2 => (
            response.rows.iter().map(|r| text(&r.cells[0])).collect(),
            vec![response.columns[1].clone()],
            response
                .rows
                .iter()
                .map(|r| vec![value(&r.cells[1])])
                .collect(),
            response.columns[0].clone(),
            response.columns[1].clone(),
        ),
        "histogram" => {
            bail!("--plot draws a histogram without `by` (use a crosstab for two fields)")
        }
        other => bail!("--plot draws crosstabs and histograms, not {other}"),
    };
    if labels.is_empty() {
        bail!("nothing to plot");
    }
    Ok(Bars {
        labels,
        stacks,
        values,
        x_title,
        y_title,
    })
}

fn render<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    bars: &Bars,
    query: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let Bars {
        labels,
        stacks,
        values,
        x_title,
        y_title,
    } = bars;
    let top = values
        .iter()
        .map(|v| v.iter().sum::<f64>())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        // Head room for the legend above the bars.
        * if stacks.len() > 1 { 1.25 } else { 1.05 };
    root.fill(&WHITE)?;
    let n = labels.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(query, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .right_y_label_area_size(0)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_desc(x_title.as_str())
        .y_desc(y_title.as_str())
        .label_style(("sans-serif", 14))
        .draw()?;
    let palette = |j: usize| -> RGBColor {
        let colors = [
            RGBColor(68, 1, 84),
            RGBColor(59, 82, 139),
            RGBColor(33, 145, 140),
            RGBColor(94, 201, 98),
            RGBColor(253, 231, 37),
            RGBColor(230, 97, 1),
            RGBColor(178, 24, 43),
            RGBColor(120, 120, 120),
        ];
        colors[j % colors.len()]
    };
    for (j, stack) in stacks.iter().enumerate() {
        let color = palette(j);
        let bars = values.iter().enumerate().map(|(i, row)| {
            let below: f64 = row[..j].iter().sum();
            Rectangle::new(
                [(i as f64 - 0.35, below), (i as f64 + 0.35, below + row[j])],
                color.filled(),
            )
        });
        chart
            .draw_series(bars)?
            .label(stack.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
    }
    if stacks.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
