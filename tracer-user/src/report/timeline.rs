//! The report's time view: drops per second by cause, each namespace's
//! table fill, and when probes were lost, on one axis (seconds since the
//! capture started). Built during the one pass over the records, rendered
//! by `json` (numbers) and `html` (the plot) alike, so both show the same.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::{cause::Cause, flows::cause_index};

/// One lost probe, placed on the time axis.
#[derive(Clone, Debug, PartialEq)]
pub struct LostProbe {
    /// Seconds since the capture started (the probe's send time).
    pub at_s: f64,
    pub host: String,
    pub seq: u64,
    /// The cause of the drop that explains it; None when none was seen.
    pub cause: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// Drops in each second, per cause (index as in `Cause::ALL`); every
    /// series has the same length.
    by_cause: Vec<Vec<u64>>,
    /// Per namespace, the highest table fill (count, max) seen at a drop
    /// in each second; None for seconds without a drop that read it.
    fill: BTreeMap<u32, Vec<Option<(u64, u64)>>>,
    pub lost_probes: Vec<LostProbe>,
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline {
            by_cause: vec![Vec::new(); Cause::ALL.len()],
            ..Default::default()
        }
    }

    /// One drop in second `sec`, with the table fill it was judged with.
    pub fn drop(&mut self, sec: usize, cause: Cause, netns: Option<u32>, fill: Option<(u64, u64)>) {
        self.grow(sec + 1);
        self.by_cause[cause_index(cause)][sec] += 1;
        if let (Some(ns), Some((count, max))) = (netns, fill) {
            let series = self.fill.entry(ns).or_default();
            if series.len() <= sec {
                series.resize(sec + 1, None);
            }
            let slot = &mut series[sec];
            if slot.is_none_or(|(c, _)| count > c) {
                *slot = Some((count, max));
            }
        }
    }

    /// Makes every series `secs` long (quiet seconds at the end count too).
    pub fn grow(&mut self, secs: usize) {
        for s in &mut self.by_cause {
            if s.len() < secs {
                s.resize(secs, 0);
            }
        }
        for s in self.fill.values_mut() {
            if s.len() < secs {
                s.resize(secs, None);
            }
        }
    }

    pub fn seconds(&self) -> usize {
        self.by_cause.first().map(Vec::len).unwrap_or(0)
    }

    /// Causes that occurred, each with its drops per second.
    pub fn causes(&self) -> impl Iterator<Item = (Cause, &[u64])> {
        Cause::ALL
            .iter()
            .zip(&self.by_cause)
            .filter(|(_, s)| s.iter().any(|n| *n > 0))
            .map(|(c, s)| (*c, &s[..]))
    }

    /// All causes summed per second.
    pub fn totals(&self) -> Vec<u64> {
        (0..self.seconds())
            .map(|i| self.by_cause.iter().map(|s| s[i]).sum())
            .collect()
    }

    /// The highest drops-per-second of any one cause.
    pub fn peak(&self) -> u64 {
        self.by_cause.iter().flatten().copied().max().unwrap_or(0)
    }

    pub fn fill(&self) -> impl Iterator<Item = (u32, &[Option<(u64, u64)>])> {
        self.fill.iter().map(|(ns, s)| (*ns, &s[..]))
    }

    pub fn to_json(&self) -> Value {
        let by_cause: Map<String, Value> = self
            .causes()
            .map(|(c, s)| (c.as_str().to_string(), json!(s)))
            .collect();
        let fill: Map<String, Value> = self
            .fill()
            .map(|(ns, s)| {
                (
                    ns.to_string(),
                    s.iter()
                        .map(|f| f.map(|(c, m)| json!([c, m])).unwrap_or(Value::Null))
                        .collect::<Value>(),
                )
            })
            .collect();
        let lost: Vec<Value> = self
            .lost_probes
            .iter()
            .map(|l| json!({"at_s": l.at_s, "host": l.host, "seq": l.seq, "cause": l.cause}))
            .collect();
        json!({
            "seconds": self.seconds(),
            "drops_per_second_by_cause": by_cause,
            "fill_per_second": fill,
            "lost_probes": lost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_land_in_their_second_and_cause_and_fill_keeps_the_highest() {
        let mut t = Timeline::new();
        t.drop(2, Cause::ConntrackTableFull, Some(7), Some((60, 64)));
        t.drop(2, Cause::ConntrackTableFull, Some(7), Some((64, 64)));
        t.drop(2, Cause::ConntrackTableFull, Some(7), Some((63, 64)));
        t.drop(0, Cause::NetfilterRule, None, None);
        t.grow(5);
        assert_eq!(t.seconds(), 5);
        let causes: Vec<(Cause, Vec<u64>)> = t.causes().map(|(c, s)| (c, s.to_vec())).collect();
        assert_eq!(
            causes,
            vec![
                (Cause::ConntrackTableFull, vec![0, 0, 3, 0, 0]),
                (Cause::NetfilterRule, vec![1, 0, 0, 0, 0])
            ]
        );
        assert_eq!(t.totals(), vec![1, 0, 3, 0, 0]);
        assert_eq!(t.peak(), 3);
        let fill: Vec<_> = t.fill().map(|(ns, s)| (ns, s.to_vec())).collect();
        assert_eq!(
            fill,
            vec![(7, vec![None, None, Some((64, 64)), None, None])]
        );
        let j = t.to_json();
        assert_eq!(
            j["drops_per_second_by_cause"]["conntrack_table_full"],
            json!([0, 0, 3, 0, 0])
        );
        assert_eq!(j["fill_per_second"]["7"][2], json!([64, 64]));
        assert!(
            j["drops_per_second_by_cause"].get("other").is_none(),
            "a cause never seen has no series"
        );
    }
}
