//! `ctdrop report`: one capture rendered in the format asked for, or two
//! compared.

use std::io::Write;

use anyhow::{Context, Result};

use super::{compare, html, json, load, text};
use crate::{
    cli::{ReportArgs, ReportFormat},
    output::{csv::CsvSink, Sink},
};

pub fn run(args: &ReportArgs) -> Result<()> {
    let mut out: std::io::BufWriter<Box<dyn Write>> = std::io::BufWriter::new(match &args.output {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    });
    if let (Some(b), Some(a)) = (&args.before, &args.after) {
        let before = load(b, |_| {})?;
        let after = load(a, |_| {})?;
        let c = compare::Comparison::new(&before, &after);
        match args.format {
            ReportFormat::Json => {
                serde_json::to_writer_pretty(&mut out, &c.to_json())?;
                writeln!(out)?;
            }
            ReportFormat::Table => out.write_all(c.render(false).as_bytes())?,
            ReportFormat::Markdown => out.write_all(c.render(true).as_bytes())?,
            ReportFormat::Html => out.write_all(html::render_comparison(&c).as_bytes())?,
            ReportFormat::Csv | ReportFormat::Prometheus => {
                anyhow::bail!("--before/--after compares for people or tools: use --format table, markdown or json")
            }
        }
        return out.flush().context("writing the report");
    }
    let path = args
        .file
        .as_ref()
        .expect("clap requires FILE without --before/--after");
    match args.format {
        ReportFormat::Csv => {
            let mut csv = CsvSink::new(&mut out);
            let mut err = None;
            let r = load(path, |s| {
                if err.is_none() {
                    err = csv.drop_event(s).err();
                }
            })?;
            if let Some(e) = err {
                return Err(e).context("writing CSV");
            }
            csv.flush().context("writing CSV")?;
            drop(csv);
            if let Some(d) = r.end.describe() {
                eprintln!("ctdrop: {}: {d}", path.display());
            }
        }
        ReportFormat::Json => {
            let r = load(path, |_| {})?;
            serde_json::to_writer_pretty(&mut out, &json::to_json(&r, args.top))?;
            writeln!(out)?;
        }
        ReportFormat::Prometheus => {
            let r = load(path, |_| {})?;
            out.write_all(r.metrics().encode_classic().as_bytes())?;
            if let Some(d) = r.end.describe() {
                eprintln!("ctdrop: {}: {d}", path.display());
            }
        }
        ReportFormat::Html => {
            let r = load(path, |_| {})?;
            out.write_all(html::render(&r, args.top).as_bytes())?;
        }
        ReportFormat::Table | ReportFormat::Markdown => {
            let r = load(path, |_| {})?;
            out.write_all(
                text::render(&r, args.top, args.format == ReportFormat::Markdown).as_bytes(),
            )?;
        }
    }
    out.flush().context("writing the report")
}
