//! Figures of a benchmark run: medians over runs, a human table, and JSON.

use std::time::Duration;

use serde::Serialize;

use super::{Mode, RunStats};

/// The figures of one contender (medians when there were several runs).
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub name: String,
    pub transport: String,
    /// Requests measured (per run).
    pub iters: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub ops_per_s: f64,
    /// Request bytes per second, in 10^6 bytes.
    pub mb_per_s: f64,
}

impl Figures {
    pub fn of(stats: &RunStats) -> Figures {
        let h = &stats.latency_ns;
        let us = |ns: u64| ns as f64 / 1000.0;
        let secs = stats.elapsed.max(Duration::from_nanos(1)).as_secs_f64();
        Figures {
            name: stats.name.clone(),
            transport: stats.transport.clone(),
            iters: stats.ops,
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            ops_per_s: stats.ops as f64 / secs,
            mb_per_s: stats.bytes as f64 / secs / 1e6,
        }
    }

    /// Field-by-field medians of several runs of one contender.
    pub fn median(runs: &[Figures]) -> Figures {
        assert!(!runs.is_empty(), "median of no runs");
        let med = |f: fn(&Figures) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mut iters: Vec<u64> = runs.iter().map(|r| r.iters).collect();
        iters.sort_unstable();
        Figures {
            name: runs[0].name.clone(),
            transport: runs[0].transport.clone(),
            iters: iters[iters.len() / 2],
            p50_us: med(|r| r.p50_us),
            p99_us: med(|r| r.p99_us),
            p999_us: med(|r| r.p999_us),
            max_us: med(|r| r.max_us),
            ops_per_s: med(|r| r.ops_per_s),
            mb_per_s: med(|r| r.mb_per_s),
        }
    }
}

/// A baseline's figures with Quiver's ratios to it.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    #[serde(flatten)]
    pub figures: Figures,
    /// quiver p50 / baseline p50 (below 1: Quiver is faster).
    pub ratio_p50: f64,
    /// quiver p99 / baseline p99.
    pub ratio_p99: f64,
    /// quiver ops/s / baseline ops/s (above 1: Quiver does more).
    pub ratio_ops: f64,
}

/// The JSON object `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub transport: String,
    pub mode: Mode,
    pub size: usize,
    pub window: usize,
    pub runs: usize,
    pub iters: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub ops_per_s: f64,
    pub mb_per_s: f64,
    pub baselines: Vec<Baseline>,
}

impl Report {
    pub fn new(
        mode: Mode,
        size: usize,
        window: usize,
        runs: usize,
        ours: Figures,
        baselines: Vec<Figures>,
    ) -> Report {
        let baselines = baselines
            .into_iter()
            .map(|b| Baseline {
                ratio_p50: ours.p50_us / b.p50_us,
                ratio_p99: ours.p99_us / b.p99_us,
                ratio_ops: ours.ops_per_s / b.ops_per_s,
                figures: b,
            })
            .collect();
        Report {
            transport: ours.transport,
            mode,
            size,
            window,
            runs,
            iters: ours.iters,
            p50_us: ours.p50_us,
            p99_us: ours.p99_us,
            p999_us: ours.p999_us,
            max_us: ours.max_us,
            ops_per_s: ours.ops_per_s,
            mb_per_s: ours.mb_per_s,
            baselines,
        }
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mode = match self.mode {
            Mode::Pingpong => "pingpong".to_string(),
            Mode::Stream => format!("stream (window {})", self.window),
        };
        let runs = if self.runs > 1 {
            format!(", medians of {} runs", self.runs)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "bench fabric: {mode}, {} bytes, {} requests per run{runs}\n",
            self.size, self.iters
        ));
        out.push_str(&format!(
            "{:<12} {:<6} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9}\n",
            "contender", "via", "p50 us", "p99 us", "p999 us", "max us", "ops/s", "MB/s"
        ));
        let row = |name: &str, transport: &str, f: (f64, f64, f64, f64, f64, f64)| {
            format!(
                "{:<12} {:<6} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11.0} {:>9.1}\n",
                name, transport, f.0, f.1, f.2, f.3, f.4, f.5
            )
        };
        out.push_str(&row(
            "quiver",
            &self.transport,
            (
                self.p50_us,
                self.p99_us,
                self.p999_us,
                self.max_us,
                self.ops_per_s,
                self.mb_per_s,
            ),
        ));
        for b in &self.baselines {
            let f = &b.figures;
            out.push_str(&row(
                &f.name,
                &f.transport,
                (
                    f.p50_us,
                    f.p99_us,
                    f.p999_us,
                    f.max_us,
                    f.ops_per_s,
                    f.mb_per_s,
                ),
            ));
        }
        for b in &self.baselines {
            out.push_str(&format!(
                "quiver / {}: p50 {:.2}x, p99 {:.2}x, ops/s {:.2}x\n",
                b.figures.name, b.ratio_p50, b.ratio_p99, b.ratio_ops
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(name: &str, p50: f64, ops: f64) -> Figures {
        Figures {
            name: name.into(),
            transport: "tcp".into(),
            iters: 10,
            p50_us: p50,
            p99_us: p50 * 2.0,
            p999_us: p50 * 3.0,
            max_us: p50 * 4.0,
            ops_per_s: ops,
            mb_per_s: ops / 1e6,
        }
    }

    #[test]
    fn medians_are_per_field_and_json_has_the_documented_fields() {
        let ours = Figures::median(&[
            figures("quiver", 10.0, 100.0),
            figures("quiver", 30.0, 300.0),
            figures("quiver", 20.0, 50.0),
        ]);
        assert_eq!((ours.p50_us, ours.ops_per_s), (20.0, 100.0));
        let report = Report::new(
            Mode::Pingpong,
            64,
            1,
            3,
            ours,
            vec![figures("raw-tcp", 40.0, 50.0)],
        );
        let json = serde_json::to_value(&report).unwrap();
        for field in [
            "transport",
            "mode",
            "size",
            "iters",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "ops_per_s",
            "mb_per_s",
            "baselines",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        let b = &json["baselines"][0];
        assert_eq!(b["name"], "raw-tcp");
        assert_eq!(b["ratio_p50"], 0.5);
        assert_eq!(b["ratio_ops"], 2.0);
        assert_eq!(json["mode"], "pingpong");
        assert!(report.table().contains("quiver / raw-tcp: p50 0.50x"));
    }
}
