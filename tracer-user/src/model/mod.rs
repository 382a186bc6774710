//! The objects ctdrop emits, defined once: their serde form is what JSON
//! lines, capture files and reports carry. Renderers (`output/`,
//! `report/`) build and read these types; this module depends on no
//! renderer. Constructors from live session values (`Shown`, `ProbeShown`)
//! live beside the outputs that own those values.
//!
//! - [`DropLine`]: one dropped packet (`kind: "drop"`).
//! - [`ProbeVerdict`]: one probe's outcome (`kind: "probe"`), stored typed
//!   in captures from format 3 on.
//! - [`occupancy::Occupancy`]: a conntrack table snapshot (who held the
//!   table), stored typed in captures and carried by reports; the builder
//!   that folds dumped entries into one stays in `conntrack::occupancy`.
//! - [`counts::CountsLine`]: count mode's periodic line (`kind: "counts"`).
//! - [`capture`]: a capture file's header and trailer.
//! - [`ReportDoc`]: a capture's report, with the pieces it shares with the
//!   live summary.
//! - [`summary::SummaryLine`]: the end-of-run summary (`kind: "summary"`),
//!   built by `crate::summary::Summary`; it shares its flow, counter and
//!   probe pieces with [`ReportDoc`].
pub mod capture;
pub mod counts;
pub mod drop;
pub mod occupancy;
pub mod probe;
pub mod report;
pub mod summary;

pub use drop::{DropLine, FillOrigin};
pub use probe::{ProbeCounts, ProbeKind, ProbeStatus, ProbeVerdict};
pub use report::ReportDoc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cause::Cause;

/// A JSON line's `"kind"`: a value with one spelling, so a typed line
/// cannot carry the wrong kind and a line of another kind does not parse.
macro_rules! kind_tag {
    ($name:ident, $s:literal) => {
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            #[default]
            #[serde(rename = $s)]
            Tag,
        }
    };
}
kind_tag!(DropKind, "drop");
kind_tag!(ProbeLineKind, "probe");
kind_tag!(CountsKind, "counts");
kind_tag!(ReportKind, "report");
kind_tag!(SummaryKind, "summary");

/// Causes are written by name (`conntrack_table_full`), as everywhere else.
impl Serialize for Cause {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Cause {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cause, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Cause::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown cause {s:?}")))
    }
}
