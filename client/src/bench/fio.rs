//! The fio baseline of `quiver bench chunkstore`: the same pattern, block
//! size, iodepth, working-set size and fdatasync policy, on a file in the same
//! directory, with fio's io_uring engine and O_DIRECT.
//!
//! fio lays its file out before the timed part when it has to: for reads
//! always, for writes because we pass `overwrite=1` (the store's chunk files
//! are preformatted, so fio's file is fully written too; otherwise fio would
//! write into fallocated, unwritten extents and pay the filesystem's extent
//! conversions inside every fdatasync). The file stays for the next run.
//!
//! Latency is fio's total latency (`lat`: from the IO unit's start, through
//! the submitting `io_uring_enter`, to its completion), not its `clat`: fio
//! starts `clat` only after the submit syscall returns, so it leaves out the
//! filesystem and block submission path (about 20 µs per 4 KiB write on the
//! development VM), while Quiver's figure runs from before its submit.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::chunkstore::{Pattern, SyncPolicy, Workload};
use super::report::Figures;
use super::Limit;

/// What to tell a user without fio.
const INSTALL_HINT: &str =
    "fio is not installed: run .ci/setup, or `apt-get install -y fio` (Debian package fio)";

/// The footnote for a report whose fio figures sum write and fdatasync latencies.
pub const SYNC_NOTE: &str = "fio times a write and its fdatasync apart: its p50/p99/p999 here \
     are write latency + fdatasync latency at the same percentile, its max the sum of both \
     maxima (Quiver's figures time the whole durable write)";

/// A run of fio: its figures, and for a durable write at iodepth 1 the time
/// per operation its write and fdatasync latencies leave out.
#[derive(Debug, Clone)]
pub struct FioRun {
    pub figures: Figures,
    /// Runtime per operation minus the mean write and mean fdatasync
    /// latencies, in microseconds (iodepth 1 with fdatasync only).
    ///
    /// With io_uring, fio's fdatasync is an IORING_OP_FSYNC, which always
    /// runs on an io-wq worker; the worker wakes on the submitting CPU and
    /// preempts fio before fio stamps the fsync's issue time, so fio's
    /// fdatasync latency starts after the flush was already sent. Traced on
    /// the development VM: 22 us per operation, the fsync submitted at +0,
    /// the flush issued at +9, fio's clock started at +22, done at +57.
    pub unaccounted_us: Option<f64>,
}

/// The footnote for every report with fio figures.
pub const LAT_NOTE: &str = "fio latencies are its total latency (lat = submission + \
     completion), like Quiver's, which run from before the submit to the completion";

/// Checks that fio runs, before any slow setup.
pub fn check_installed() -> anyhow::Result<String> {
    let out = match Command::new("fio").arg("--version").output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(INSTALL_HINT),
        Err(e) => return Err(e).context("running fio --version"),
    };
    if !out.status.success() {
        bail!("fio --version failed ({}); {INSTALL_HINT}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// fio's command line for `w` on `file`.
pub fn args(w: &Workload, file: &Path) -> anyhow::Result<Vec<String>> {
    let file = file
        .to_str()
        .with_context(|| format!("{} is not UTF-8, which fio cannot take", file.display()))?;
    // fio separates several files with ':'; a literal one is escaped.
    let file = file.replace(':', "\\:");
    let rw = match w.pattern {
        Pattern::Randwrite => "randwrite",
        Pattern::Randread => "randread",
        Pattern::Seqwrite => "write",
    };
    let mut args = vec![
        "--name=quiver".to_string(),
        format!("--filename={file}"),
        format!("--size={}", w.size),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.iodepth),
        "--ioengine=io_uring".to_string(),
        "--direct=1".to_string(),
        format!("--rw={rw}"),
        "--randrepeat=0".to_string(),
        "--norandommap".to_string(),
        "--percentile_list=50:99:99.9".to_string(),
        // Percentiles of the total latency too, not only of clat.
        "--lat_percentiles=1".to_string(),
        "--output-format=json".to_string(),
    ];
    if w.pattern.is_write() {
        args.push("--overwrite=1".to_string());
        if w.sync == SyncPolicy::Always {
            args.push("--fdatasync=1".to_string());
        }
    }
    match w.limit {
        Limit::Duration(d) => {
            args.push("--time_based".to_string());
            args.push(format!("--runtime={}ms", d.as_millis().max(1)));
        }
        Limit::Iters(n) => {
            // io_size lets the job wrap past the file's end; number_ios stops it.
            let bytes = n.checked_mul(w.bs).context("--iters x --bs overflows")?;
            args.push(format!("--io_size={bytes}"));
            args.push(format!("--number_ios={n}"));
        }
    }
    Ok(args)
}

/// Runs fio once and returns its figures.
pub fn run(w: &Workload, file: &Path) -> anyhow::Result<FioRun> {
    let args = args(w, file)?;
    tracing::debug!(?args, "running fio");
    let out = match Command::new("fio").args(&args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(INSTALL_HINT),
        Err(e) => return Err(e).context("running fio"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "fio failed ({}): {}{}",
            out.status,
            tail(stderr.trim()),
            tail(stdout.trim())
        );
    }
    if !stderr.trim().is_empty() {
        tracing::info!(stderr = %stderr.trim(), "fio said");
    }
    parse(&stdout, w).with_context(|| format!("reading fio's JSON output: {}", tail(&stdout)))
}

/// The last part of a long message.
fn tail(text: &str) -> &str {
    const KEEP: usize = 2000;
    let mut start = text.len().saturating_sub(KEEP);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

#[derive(Deserialize)]
struct Output {
    jobs: Vec<Job>,
}

#[derive(Deserialize)]
struct Job {
    error: i64,
    read: Direction,
    write: Direction,
    sync: Option<SyncSide>,
}

#[derive(Deserialize)]
struct Direction {
    total_ios: u64,
    iops: f64,
    bw_bytes: f64,
    /// Total latency: submission + completion.
    lat_ns: Latency,
}

#[derive(Deserialize)]
struct SyncSide {
    lat_ns: Latency,
}

#[derive(Deserialize)]
struct Latency {
    max: f64,
    #[serde(default)]
    mean: Option<f64>,
    #[serde(rename = "N", default)]
    n: u64,
    /// "50.000000" -> ns.
    #[serde(default)]
    percentile: HashMap<String, f64>,
}

impl Latency {
    /// The percentile `p` (e.g. 99.9) in nanoseconds.
    fn at(&self, p: f64, what: &str) -> anyhow::Result<f64> {
        self.percentile
            .iter()
            .find(|(k, _)| k.parse::<f64>().is_ok_and(|v| (v - p).abs() < 1e-6))
            .map(|(_, &ns)| ns)
            .with_context(|| format!("fio reported no p{p} {what} latency"))
    }

    /// p50, p99, p999 and max in nanoseconds.
    fn figures(&self, what: &str) -> anyhow::Result<[f64; 4]> {
        if self.n == 0 {
            bail!("fio recorded no {what} latencies");
        }
        Ok([
            self.at(50.0, what)?,
            self.at(99.0, what)?,
            self.at(99.9, what)?,
            self.max,
        ])
    }
}

/// fio's JSON (anything it printed before the object is skipped) as figures.
pub fn parse(stdout: &str, w: &Workload) -> anyhow::Result<FioRun> {
    let start = stdout.find('{').context("no JSON object")?;
    let output: Output = serde_json::from_str(&stdout[start..])?;
    let job = output.jobs.first().context("no job in the output")?;
    if job.error != 0 {
        bail!("the fio job failed with error {}", job.error);
    }
    let (dir, what) = if w.pattern.is_write() {
        (&job.write, "write")
    } else {
        (&job.read, "read")
    };
    let mut ns = dir.lat_ns.figures(what)?;
    let mut unaccounted_us = None;
    if w.pattern.is_write() && w.sync == SyncPolicy::Always {
        // fio reports a write and its fdatasync separately; the durable write
        // Quiver times is both, so fio's figure is formed as write latency +
        // fdatasync latency, percentile by percentile (and max as the sum of
        // maxima). See SYNC_NOTE, printed under the table.
        let sync = &job
            .sync
            .as_ref()
            .context("fio reported no fdatasync latencies")?
            .lat_ns;
        for (total, s) in ns.iter_mut().zip(sync.figures("fdatasync")?) {
            *total += s;
        }
        if let (1, Some(write), Some(fdatasync)) = (w.iodepth, dir.lat_ns.mean, sync.mean) {
            if dir.iops > 0.0 {
                // One operation at a time: runtime per op is its whole latency.
                let per_op_ns = 1e9 / dir.iops;
                unaccounted_us = Some((per_op_ns - write - fdatasync) / 1000.0);
            }
        }
    }
    let us = |ns: f64| ns / 1000.0;
    let figures = Figures {
        name: "fio".to_string(),
        transport: "io_uring".to_string(),
        iters: dir.total_ios,
        p50_us: us(ns[0]),
        p99_us: us(ns[1]),
        p999_us: us(ns[2]),
        max_us: us(ns[3]),
        ops_per_s: dir.iops,
        mb_per_s: dir.bw_bytes / 1e6,
    };
    Ok(FioRun {
        figures,
        unaccounted_us,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    fn workload(pattern: Pattern, sync: SyncPolicy, limit: Limit) -> Workload {
        Workload {
            pattern,
            bs: 4096,
            iodepth: 32,
            size: 1 << 30,
            sync,
            limit,
            warmup: 0,
            device_flush: true,
        }
    }

    /// The parts of fio 3.33's JSON we read, trimmed from a real randwrite
    /// run with fdatasync=1 and lat_percentiles=1.
    const SAMPLE: &str = r#"note: a line fio may print first
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "quiver",
      "error" : 0,
      "read" : {
        "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.000000, "runtime" : 0, "total_ios" : 0,
        "clat_ns" : { "min" : 0, "max" : 0, "mean" : 0.000000, "stddev" : 0.000000, "N" : 0 },
        "lat_ns" : { "min" : 0, "max" : 0, "mean" : 0.000000, "stddev" : 0.000000, "N" : 0 }
      },
      "write" : {
        "io_bytes" : 12288000, "bw_bytes" : 28248275, "iops" : 6896.551724,
        "runtime" : 435, "total_ios" : 3000,
        "clat_ns" : {
          "min" : 160, "max" : 1406007, "mean" : 67511.776333, "stddev" : 38256.0, "N" : 3000,
          "percentile" : { "50.000000" : 59648, "99.000000" : 127488, "99.900000" : 577536 }
        },
        "lat_ns" : {
          "min" : 40300, "max" : 1428961, "mean" : 83028.002333, "stddev" : 39829.9, "N" : 3000,
          "percentile" : { "50.000000" : 74240, "99.000000" : 144384, "99.900000" : 593920 }
        }
      },
      "sync" : {
        "total_ios" : 0,
        "lat_ns" : {
          "min" : 741, "max" : 929366, "mean" : 41088.046349, "stddev" : 23586.9, "N" : 2999,
          "percentile" : { "50.000000" : 38656, "99.000000" : 95744, "99.900000" : 329728 }
        }
      }
    }
  ]
}"#;

    #[test]
    fn sync_always_sums_write_and_fdatasync_latencies() {
        let w = workload(Pattern::Randwrite, SyncPolicy::Always, Limit::Iters(10));
        let run = parse(SAMPLE, &w).unwrap();
        assert_eq!(
            run.unaccounted_us, None,
            "iodepth 32: runtime is not latency"
        );
        let f = run.figures;
        assert_eq!((f.name.as_str(), f.iters), ("fio", 3000));
        // Total latency (lat), not clat: write + fdatasync at each percentile.
        assert!((f.p50_us - (74.240 + 38.656)).abs() < 1e-9);
        assert!((f.p999_us - (593.920 + 329.728)).abs() < 1e-9);
        assert!((f.max_us - (1428.961 + 929.366)).abs() < 1e-9);
        assert!((f.ops_per_s - 6896.551724).abs() < 1e-9);
        assert!((f.mb_per_s - 28.248275).abs() < 1e-9);
        let never = parse(
            SAMPLE,
            &workload(Pattern::Randwrite, SyncPolicy::Never, w.limit),
        );
        assert!((never.unwrap().figures.p50_us - 74.240).abs() < 1e-9);
        // At iodepth 1, runtime per op (1e9 / 6896.55 ns) minus the means.
        let qd1 = Workload { iodepth: 1, ..w };
        let gap = parse(SAMPLE, &qd1).unwrap().unaccounted_us.unwrap();
        assert!(
            (gap - (145.0 - 83.028002333 - 41.088046349)).abs() < 1e-3,
            "{gap}"
        );
        // A read job's side is empty here: an error, not zeros.
        let read = parse(
            SAMPLE,
            &workload(Pattern::Randread, SyncPolicy::Never, w.limit),
        );
        assert!(read.is_err());
        assert!(parse("fio: oops", &w).is_err());
    }

    #[test]
    fn the_command_line_matches_the_workload() {
        let file = PathBuf::from("/data/a:b/fio.dat");
        let w = workload(
            Pattern::Randwrite,
            SyncPolicy::Always,
            Limit::Duration(Duration::from_secs(3)),
        );
        let a = args(&w, &file).unwrap();
        for want in [
            "--filename=/data/a\\:b/fio.dat",
            "--size=1073741824",
            "--bs=4096",
            "--iodepth=32",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--fdatasync=1",
            "--overwrite=1",
            "--time_based",
            "--runtime=3000ms",
            "--norandommap",
            "--randrepeat=0",
            "--lat_percentiles=1",
        ] {
            assert!(a.iter().any(|x| x == want), "missing {want} in {a:?}");
        }
        let r = args(
            &workload(Pattern::Randread, SyncPolicy::Always, Limit::Iters(100)),
            &file,
        )
        .unwrap();
        assert!(r.iter().any(|x| x == "--rw=randread"));
        assert!(r.iter().any(|x| x == "--number_ios=100"));
        assert!(r.iter().any(|x| x == "--io_size=409600"));
        assert!(!r.iter().any(|x| x.starts_with("--fdatasync")));
        let s = args(
            &workload(Pattern::Seqwrite, SyncPolicy::Never, Limit::Iters(1)),
            &file,
        )
        .unwrap();
        assert!(s.iter().any(|x| x == "--rw=write"));
        assert!(!s.iter().any(|x| x.starts_with("--fdatasync")));
    }
}
