//! CSV: one row per drop, with exactly the fields (and names) of the drop
//! JSON lines, because both come from [`DropLine`]. Probe verdicts and the
//! summary have other shapes and are left to JSON.

use std::io::Write;

use super::{ProbeShown, Shown, Sink};
use crate::model::DropLine;

pub struct CsvSink<W: Write> {
    out: csv::Writer<W>,
}

impl<W: Write> CsvSink<W> {
    pub fn new(out: W) -> Self {
        CsvSink {
            out: csv::Writer::from_writer(out),
        }
    }
}

fn io(e: csv::Error) -> std::io::Error {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => e,
        other => std::io::Error::other(format!("{other:?}")),
    }
}

impl<W: Write> Sink for CsvSink<W> {
    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()> {
        self.out.serialize(DropLine::from_shown(s)).map_err(io)
    }

    fn probe(&mut self, _p: &ProbeShown) -> std::io::Result<()> {
        Ok(())
    }

    fn summary(&mut self, _s: &crate::summary::Summary) -> std::io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
