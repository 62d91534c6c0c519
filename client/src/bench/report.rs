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
            median_of(&mut v).expect("runs is not empty")
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

/// The median of `values` (sorted in place; the upper one of an even count).
pub fn median_of(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
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

/// The JSON object `--json` prints. `bench fabric` and `bench chunkstore`
/// share it: the fields they have in common come first and keep their names;
/// the chunk store's own (`iodepth`, `sync`, `working_set_bytes`) are absent
/// from `bench fabric`'s JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The table's first line.
    #[serde(skip)]
    title: String,
    /// Footnotes printed under the table.
    #[serde(skip)]
    notes: Vec<String>,
    pub transport: String,
    /// fabric: pingpong or stream; chunkstore: the IO pattern.
    pub mode: String,
    /// fabric: request bytes; chunkstore: block bytes.
    pub size: usize,
    /// Operations in flight.
    pub window: usize,
    /// chunkstore: operations in flight (fio's name for `window`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iodepth: Option<usize>,
    /// chunkstore: "always" (every write durable) or "never".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<String>,
    /// chunkstore: bytes the offsets range over (fio's file size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_set_bytes: Option<u64>,
    /// replication: chunkserver processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunkservers: Option<usize>,
    /// replication: copysets written to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copysets: Option<u32>,
    /// replication: 1.5 x (chunkstore p50 + 2 x fabric p50), the p50 to stay under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_p50_us: Option<f64>,
    /// volume with --verify: reads whose contents were checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_reads: Option<u64>,
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

/// What `bench chunkstore` ran, for its report.
#[derive(Debug, Clone)]
pub struct ChunkstoreRun {
    /// randwrite, randread or seqwrite.
    pub pattern: String,
    pub bs: usize,
    pub iodepth: usize,
    /// Writes: "always" or "never"; reads: none.
    pub sync: Option<String>,
    pub working_set_bytes: u64,
    pub runs: usize,
}

impl Report {
    /// The report of `bench fabric`.
    pub fn new(
        mode: Mode,
        size: usize,
        window: usize,
        runs: usize,
        ours: Figures,
        baselines: Vec<Figures>,
    ) -> Report {
        let mode_name = match mode {
            Mode::Pingpong => "pingpong",
            Mode::Stream => "stream",
        };
        let shown = match mode {
            Mode::Pingpong => "pingpong".to_string(),
            Mode::Stream => format!("stream (window {window})"),
        };
        let title = format!(
            "bench fabric: {shown}, {size} bytes, {} requests per run{}",
            ours.iters,
            medians_of(runs)
        );
        let mut report = Report::build(title, mode_name.to_string(), size, window, runs, ours);
        report.add_baselines(baselines);
        report
    }

    /// The report of `bench chunkstore`; `notes` go under the table.
    pub fn chunkstore(
        run: &ChunkstoreRun,
        ours: Figures,
        baselines: Vec<Figures>,
        notes: Vec<String>,
    ) -> Report {
        let sync = match &run.sync {
            Some(policy) => format!(", sync {policy}"),
            None => String::new(),
        };
        let title = format!(
            "bench chunkstore: {}, {} bytes per op, iodepth {}{sync}, {} working set, {} ops per run{}",
            run.pattern,
            run.bs,
            run.iodepth,
            super::format_size(run.working_set_bytes),
            ours.iters,
            medians_of(run.runs)
        );
        let mut report = Report::build(
            title,
            run.pattern.clone(),
            run.bs,
            run.iodepth,
            run.runs,
            ours,
        );
        report.iodepth = Some(run.iodepth);
        report.sync = run.sync.clone();
        report.working_set_bytes = Some(run.working_set_bytes);
        report.notes = notes;
        report.add_baselines(baselines);
        report
    }

    /// The report of `bench replication`: baselines `chunkstore` and
    /// `fabric` (the target's terms), and `pipeline` where measured.
    pub fn replication(
        setup: &super::replication::Setup,
        runs: usize,
        ours: Figures,
        chunkstore: Figures,
        fabric: Figures,
        pipeline: Option<Figures>,
    ) -> Report {
        let title = format!(
            "bench replication: 3-replica writes, {} bytes, iodepth {}, {} copysets on {} chunkservers, {} writes per run{}",
            setup.bs,
            setup.iodepth,
            setup.copysets,
            setup.chunkservers,
            ours.iters,
            medians_of(runs)
        );
        let target = 1.5 * (chunkstore.p50_us + 2.0 * fabric.p50_us);
        let mut report = Report::build(
            title,
            "randwrite".into(),
            setup.bs,
            setup.iodepth,
            runs,
            ours,
        );
        report.iodepth = Some(setup.iodepth);
        report.sync = Some("raft".into());
        report.chunkservers = Some(setup.chunkservers);
        report.copysets = Some(setup.copysets);
        report.target_p50_us = Some(target);
        report.notes = vec![
            if setup.device_flush {
                "chunkstore: the same writes on one local chunk store, each durable \
                 (a device flush where the filesystem allows, else fdatasync)"
                    .into()
            } else {
                "chunkstore: the same writes on one local chunk store, fdatasync each".into()
            },
            format!(
                "fabric: a round trip of {} bytes ({})",
                setup.bs,
                if setup.iodepth == 1 {
                    "ping-pong".to_string()
                } else {
                    format!("{} in flight", setup.iodepth)
                }
            ),
            format!(
                "target: p50 <= 1.5 x (chunkstore p50 + 2 x fabric p50) = {target:.1} us; quiver is at {:.2}x of it",
                report.p50_us / target
            ),
        ];
        let mut baselines = vec![chunkstore, fabric];
        if let Some(pipeline) = pipeline {
            report.notes.push(format!(
                "pipeline: the same replicated write as bare threads (blocking loopback TCP, \
                 O_DIRECT write and flush on each replica, answer after the leader and one \
                 follower): {:.1} us p50, {:.2}x the target; quiver is at {:.2}x of it",
                pipeline.p50_us,
                pipeline.p50_us / target,
                report.p50_us / pipeline.p50_us
            ));
            baselines.push(pipeline);
        }
        report.add_baselines(baselines);
        report
    }

    /// The report of `bench volume`.
    pub fn volume(
        volume: &str,
        w: &super::volume::VolumeWorkload,
        ours: Figures,
        verified_reads: u64,
    ) -> Report {
        let title = format!(
            "bench volume: {} on {volume}, {} bytes per op, iodepth {}, {} working set, {} ops",
            w.pattern.name(),
            w.bs,
            w.iodepth,
            super::format_size(w.working_set),
            ours.iters,
        );
        let mut report = Report::build(title, w.pattern.name().into(), w.bs, w.iodepth, 1, ours);
        report.iodepth = Some(w.iodepth);
        report.sync = Some("raft".into());
        report.working_set_bytes = Some(w.working_set);
        report.verified_reads = w.verify.then_some(verified_reads);
        if w.verify {
            report.notes = vec![format!(
                "verified: {verified_reads} reads checked (offset, generation, checksum), none wrong"
            )];
        }
        report
    }

    fn build(
        title: String,
        mode: String,
        size: usize,
        window: usize,
        runs: usize,
        ours: Figures,
    ) -> Report {
        Report {
            title,
            notes: Vec::new(),
            transport: ours.transport,
            mode,
            size,
            window,
            iodepth: None,
            sync: None,
            working_set_bytes: None,
            chunkservers: None,
            copysets: None,
            target_p50_us: None,
            verified_reads: None,
            runs,
            iters: ours.iters,
            p50_us: ours.p50_us,
            p99_us: ours.p99_us,
            p999_us: ours.p999_us,
            max_us: ours.max_us,
            ops_per_s: ours.ops_per_s,
            mb_per_s: ours.mb_per_s,
            baselines: Vec::new(),
        }
    }

    fn add_baselines(&mut self, baselines: Vec<Figures>) {
        self.baselines = baselines
            .into_iter()
            .map(|b| Baseline {
                ratio_p50: self.p50_us / b.p50_us,
                ratio_p99: self.p99_us / b.p99_us,
                ratio_ops: self.ops_per_s / b.ops_per_s,
                figures: b,
            })
            .collect();
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&self.title);
        out.push('\n');
        // Wide enough for every transport name, and never narrower than 6.
        let via = self
            .baselines
            .iter()
            .map(|b| b.figures.transport.len())
            .chain([self.transport.len(), 6])
            .max()
            .unwrap_or(6);
        out.push_str(&format!(
            "{:<12} {:<via$} {:>9} {:>9} {:>9} {:>9} {:>11} {:>9}\n",
            "contender", "via", "p50 us", "p99 us", "p999 us", "max us", "ops/s", "MB/s"
        ));
        let row = |name: &str, transport: &str, f: (f64, f64, f64, f64, f64, f64)| {
            format!(
                "{:<12} {:<via$} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11.0} {:>9.1}\n",
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
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }
}

fn medians_of(runs: usize) -> String {
    if runs > 1 {
        format!(", medians of {runs} runs")
    } else {
        String::new()
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

    #[test]
    fn fabric_json_keeps_its_fields_and_chunkstore_adds_its_own() {
        let fabric = Report::new(
            Mode::Stream,
            64,
            16,
            1,
            figures("quiver", 10.0, 100.0),
            vec![],
        );
        let json = serde_json::to_value(&fabric).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut want = vec![
            "transport",
            "mode",
            "size",
            "window",
            "runs",
            "iters",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "ops_per_s",
            "mb_per_s",
            "baselines",
        ];
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        want.sort_unstable();
        assert_eq!(sorted, want);
        assert_eq!(json["mode"], "stream");
        assert!(fabric
            .table()
            .starts_with("bench fabric: stream (window 16), 64 bytes, 10 requests per run\n"));

        let mut ours = figures("quiver", 200.0, 5000.0);
        ours.transport = "io_uring".into();
        let mut fio = figures("fio", 180.0, 5500.0);
        fio.transport = "io_uring".into();
        let run = ChunkstoreRun {
            pattern: "randwrite".into(),
            bs: 4096,
            iodepth: 1,
            sync: Some("always".into()),
            working_set_bytes: 256 << 20,
            runs: 3,
        };
        let report = Report::chunkstore(&run, ours, vec![fio], vec!["a footnote".into()]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["mode"], "randwrite");
        assert_eq!(json["transport"], "io_uring");
        assert_eq!(json["size"], 4096);
        assert_eq!(json["iodepth"], 1);
        assert_eq!(json["window"], 1);
        assert_eq!(json["sync"], "always");
        assert_eq!(json["working_set_bytes"], 256 << 20);
        assert_eq!(json["baselines"][0]["name"], "fio");
        let table = report.table();
        assert!(table.contains("iodepth 1, sync always, 256 MiB working set"));
        assert!(table.contains("medians of 3 runs"));
        assert!(table.contains("quiver / fio: p50 1.11x"));
        assert!(table.ends_with("note: a footnote\n"));
        // Columns line up with the wider transport name.
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[1].len(), lines[2].len());
        assert_eq!(lines[2].len(), lines[3].len());
    }
}
