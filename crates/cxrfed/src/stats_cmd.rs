//! `cxrfed stats` and `cxrfed export`: exact statistics and flattened exports from a node
//! (site admin only), and DP statistics (`cxrfed stats --dp`, researchers too).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use cxrfed_proto::v1 as pb;

use crate::client::{Credentials, status_error};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The query, e.g. 'crosstab image_quality, analysis_confidence where view = PA normalize=row'
    /// (grammar: crates/cxrfed-stats/src/query.rs and the README).
    query: String,
    /// Node URL [default: the profile's node, else https://127.0.0.1:50051].
    #[arg(long, env = "CXRFED_NODE")]
    node: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    /// table, csv or json.
    #[arg(long, default_value = "table")]
    format: String,
    /// Also draw the result as a PNG chart: a stacked bar chart for a crosstab, bars for a
    /// histogram.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// A differentially private release (what researchers get): noisy values with 95% error
    /// bounds, charged to your privacy budget and recorded on the node's audit chain.
    #[arg(long)]
    dp: bool,
    /// The privacy loss to spend on this release (with --dp).
    #[arg(long, requires = "dp")]
    epsilon: Option<f64>,
    /// delta: needed by --mechanism gaussian and by releases over months or modalities.
    #[arg(long, requires = "dp", default_value_t = 0.0)]
    delta: f64,
    /// laplace (pure epsilon) or gaussian (zCDP, converted to (epsilon, delta)).
    #[arg(long, requires = "dp", value_enum, default_value_t = MechanismArg::Laplace)]
    mechanism: MechanismArg,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Node URL [default: the profile's node, else https://127.0.0.1:50051].
    #[arg(long, env = "CXRFED_NODE")]
    node: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    /// csv, jsonl, parquet; dicom-sr: one DICOM SR (TID 1500) per record into the directory
    /// `--out` (docs/sr-codes.md); fhir: one FHIR R4 Bundle (DiagnosticReport, Observations).
    #[arg(long, default_value = "csv")]
    format: String,
    /// Only records matching this condition, e.g. 'view = PA and month >= 2020-01'.
    #[arg(long = "where")]
    filter: Option<String>,
    /// Write to this file (a directory for dicom-sr) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// dicom-sr: also send the SRs to this PACS by C-STORE (AE@HOST:PORT).
    #[arg(long, value_name = "AE@HOST:PORT")]
    send: Option<cxrfed_dicom::scu::Peer>,
    /// dicom-sr: the calling AE title for --send.
    #[arg(long, default_value = "CXRFED", value_name = "AE")]
    calling_ae: String,
}

fn cell_text(cell: &pb::StatsCell, fraction: bool) -> String {
    use pb::stats_cell::Value;
    match &cell.value {
        Some(Value::Text(t)) => t.clone(),
        Some(Value::Count(n)) => n.to_string(),
        Some(Value::Number(x)) if fraction => format!("{x:.3}"),
        Some(Value::Number(x)) => format!("{x:.4}"),
        None => String::new(),
    }
}

fn cell_json(cell: &pb::StatsCell) -> serde_json::Value {
    use pb::stats_cell::Value;
    match &cell.value {
        Some(Value::Text(t)) => serde_json::Value::String(t.clone()),
        Some(Value::Count(n)) => serde_json::Value::from(*n),
        Some(Value::Number(x)) => serde_json::Number::from_f64(*x)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        None => serde_json::Value::Null,
    }
}

/// A status error, pointing at the offending token of a query parse error.
fn query_status_error(status: tonic::Status, query: &str) -> anyhow::Error {
    let caret = status
        .message()
        .strip_prefix("invalid request: query: at ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|p| p.parse::<usize>().ok())
        .map(|p| format!("\n  {query}\n  {}^", " ".repeat(p)))
        .unwrap_or_default();
    anyhow::anyhow!("{}{caret}", status_error(status))
}

pub async fn stats(args: StatsArgs) -> anyhow::Result<ExitCode> {
    if !matches!(args.format.as_str(), "table" | "csv" | "json") {
        bail!("unknown format {:?} (table, csv or json)", args.format);
    }
    let mut client = args.credentials.connect_node(args.node.as_deref()).await?;
    if args.dp {
        if args.plot.is_some() {
            bail!("--plot draws exact results; leave it out with --dp");
        }
        let Some(epsilon) = args.epsilon else {
            bail!("--dp needs --epsilon (the privacy loss to spend, e.g. 0.5)");
        };
        let request = pb::DpStatsRequest {
            query: args.query.clone(),
            structured: None,
            epsilon,
            delta: args.delta,
            mechanism: pb::Mechanism::from(args.mechanism).into(),
        };
        let response = client
            .dp_stats(request)
            .await
            .map_err(|status| query_status_error(status, &args.query))?
            .into_inner();
        return crate::privacy_cmd::print_release(&response, &args.format);
    }
    let response = client
        .stats(pb::StatsRequest {
            query: args.query.clone(),
            structured: None,
        })
        .await
        .map_err(|status| query_status_error(status, &args.query))?
        .into_inner();
    if let Some(path) = &args.plot {
        crate::plot::draw(&response, &args.query, path)?;
        eprintln!("chart written to {}", path.display());
    }
    let fraction = args.query.contains("normalize");
    let mut out = std::io::stdout().lock();
    match args.format.as_str() {
        "json" => {
            let rows: Vec<Vec<serde_json::Value>> = response
                .rows
                .iter()
                .map(|r| r.cells.iter().map(cell_json).collect())
                .collect();
            let doc = serde_json::json!({
                "statistic": response.statistic,
                "columns": response.columns,
                "rows": rows,
                "cohort_size": response.cohort_size,
                "record_count": response.record_count,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        }
        "csv" => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(&response.columns)?;
            for row in &response.rows {
                w.write_record(row.cells.iter().map(|c| cell_text(c, fraction)))?;
            }
            w.flush()?;
        }
        _ => {
            let body: Vec<Vec<String>> = response
                .rows
                .iter()
                .map(|r| r.cells.iter().map(|c| cell_text(c, fraction)).collect())
                .collect();
            print_table(&mut out, &response.columns, &body)?;
            writeln!(
                out,
                "({} of {} records in the cohort; exact, site admin only)",
                response.cohort_size, response.record_count
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--mechanism`, parsed by clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MechanismArg {
    /// Discrete Laplace: pure epsilon-DP.
    Laplace,
    /// Discrete Gaussian: zCDP converted to (epsilon, delta).
    Gaussian,
}

impl From<MechanismArg> for pb::Mechanism {
    fn from(m: MechanismArg) -> pb::Mechanism {
        match m {
            MechanismArg::Laplace => pb::Mechanism::Laplace,
            MechanismArg::Gaussian => pb::Mechanism::Gaussian,
        }
    }
}

/// A plain-text table (comfy-table, no borders): numbers right-aligned (but the first
/// column), a rule under the header, two spaces between columns.
pub fn print_table(
    out: &mut impl Write,
    header: &[String],
    body: &[Vec<String>],
) -> std::io::Result<()> {
    use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
    // Only the header rule: every other component of the preset is blank.
    const HEADER_RULE_ONLY: &str = "     -             ";
    let mut table = Table::new();
    table
        .load_preset(HEADER_RULE_ONLY)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(Cell::new));
    for row in body {
        table.add_row(row.iter().enumerate().map(|(i, c)| {
            let numeric = c
                .split_whitespace()
                .next()
                .is_some_and(|n| n.parse::<f64>().is_ok());
            let cell = Cell::new(c);
            if numeric && i > 0 {
                cell.set_alignment(CellAlignment::Right)
            } else {
                cell
            }
        }));
    }
    let last = header.len().saturating_sub(1);
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { 2 }));
    }
    for line in table.lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

pub async fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    if args.format == "dicom-sr" {
        let out = args
            .out
            .clone()
            .context("--format dicom-sr writes one file per record: give --out DIR")?;
        let client = args.credentials.connect_node(args.node.as_deref()).await?;
        return crate::sr_export::export(
            client,
            args.filter.clone().unwrap_or_default(),
            out,
            args.send.clone(),
            args.calling_ae.clone(),
        )
        .await;
    }
    if args.format == "fhir" {
        anyhow::ensure!(
            args.send.is_none(),
            "--send sends DICOM SRs: use it with --format dicom-sr"
        );
        let client = args.credentials.connect_node(args.node.as_deref()).await?;
        return crate::sr_export::export_fhir(
            client,
            args.filter.clone().unwrap_or_default(),
            args.out.clone(),
        )
        .await;
    }
    anyhow::ensure!(
        args.send.is_none(),
        "--send sends DICOM SRs: use it with --format dicom-sr"
    );
    let mut client = args.credentials.connect_node(args.node.as_deref()).await?;
    let mut stream = client
        .export(pb::ExportRequest {
            format: args.format.clone(),
            r#where: args.filter.clone().unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut records = 0;
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        out.write_all(&chunk.data)?;
        records += chunk.records;
    }
    out.flush()?;
    eprintln!("exported {records} records");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod table_tests {
    #[test]
    fn tables_align_numbers_under_a_header_rule() {
        let mut out = Vec::new();
        super::print_table(
            &mut out,
            &["site".into(), "count".into(), "status".into()],
            &[
                vec!["a".into(), "12".into(), "ok".into()],
                vec!["longer-site".into(), "3".into(), "budget_exhausted".into()],
            ],
        )
        .expect("print");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "site         count  status");
        assert!(lines[1].starts_with("-----") && !lines[1].contains(' '));
        assert_eq!(lines[2], "a               12  ok");
        assert_eq!(lines[3], "longer-site      3  budget_exhausted");
    }
}
