//! Prometheus text exposition (format 0.0.4) for `GET /metrics`.
//!
//! Every metric is declared once with its help text, so that what a number means is written down
//! next to where it is produced (STYLE.md 13).

use std::fmt::Write as _;

/// A per-peer metric read from a row of type `T`: name, kind, help, and how to read the value
/// (`None` leaves that peer out of the family).
pub type PeerMetric<T> = (&'static str, Kind, &'static str, fn(&T) -> Option<f64>);

/// A metrics page under construction.
#[derive(Debug, Default)]
pub struct MetricsPage {
    out: String,
}

/// Kind of a metric family.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A value that only goes up (resets on restart).
    Counter,
}

impl MetricsPage {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(
            self.out,
            "# HELP {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n")
        );
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        if value.is_nan() {
            self.out.push_str(" NaN\n");
        } else {
            let _ = writeln!(self.out, " {value}");
        }
        self
    }

    /// One family per entry of `metrics`, each with a sample per `(peer, row)`: the tables of
    /// per-peer counters stay one line per metric.
    pub fn per_peer<T>(&mut self, metrics: &[PeerMetric<T>], rows: &[(String, T)]) -> &mut Self {
        for (name, kind, help, get) in metrics {
            self.family(name, *kind, help);
            for (peer, row) in rows {
                if let Some(v) = get(row) {
                    self.sample(name, &[("peer", peer)], v);
                }
            }
        }
        self
    }

    /// The finished page.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_labels_and_declares_types() {
        let mut m = MetricsPage::default();
        m.family(
            "confmesh_peer_active",
            Kind::Gauge,
            "1 when the peer is active",
        )
        .sample(
            "confmesh_peer_active",
            &[("peer", "10.96.0.2"), ("host", "a\"b")],
            1.0,
        );
        let text = m.finish();
        assert_eq!(
            text,
            "# HELP confmesh_peer_active 1 when the peer is active\n# TYPE confmesh_peer_active gauge\n\
             confmesh_peer_active{peer=\"10.96.0.2\",host=\"a\\\"b\"} 1\n"
        );
    }
}
