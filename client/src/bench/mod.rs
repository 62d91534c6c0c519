//! Benchmarks a latency user runs: `quiver bench fabric` and
//! `quiver bench chunkstore`, each with its baselines.

pub mod baseline;
pub mod chunkstore;
pub mod fabric;
pub mod fio;
pub mod pipeline;
pub mod raftlog;
pub mod replication;
pub mod report;
pub mod volume;

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// What a run exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One outstanding request at a time: latency.
    Pingpong,
    /// `window` outstanding requests: throughput.
    Stream,
}

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Iters(u64),
    Duration(Duration),
}

/// The workload every contender (ours and the baselines) runs the same way:
/// a client sends `size`-byte requests, the server answers each with a
/// `response_bytes`-byte response (the request echoed in ping-pong mode, an
/// 8-byte acknowledgement in stream mode).
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub mode: Mode,
    pub size: usize,
    pub limit: Limit,
    /// Requests in flight in stream mode (1 in ping-pong).
    pub window: usize,
    /// Untimed requests before measuring.
    pub warmup: u64,
}

impl Workload {
    /// Bytes the server sends back per request.
    pub fn response_bytes(&self) -> usize {
        match self.mode {
            Mode::Pingpong => self.size,
            Mode::Stream => STREAM_ACK_BYTES,
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        match self.mode {
            Mode::Pingpong => 1,
            Mode::Stream => self.window.max(1),
        }
    }
}

/// Size of the acknowledgement a stream-mode server returns per request.
pub const STREAM_ACK_BYTES: usize = quiver_fabric::echo::ACK_BYTES;

/// What one contender measured.
pub struct RunStats {
    /// "quiver", "raw-tcp", "grpc".
    pub name: String,
    /// Transport actually used.
    pub transport: String,
    /// Per-request latency (send to response) in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// Requests completed in the measured part.
    pub ops: u64,
    /// Request bytes moved in the measured part.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl RunStats {
    pub fn new(name: &str, transport: &str) -> RunStats {
        RunStats {
            name: name.to_string(),
            transport: transport.to_string(),
            // 1 ns .. 100 s at 3 significant digits.
            latency_ns: Histogram::new_with_bounds(1, 100_000_000_000, 3)
                .expect("static histogram bounds"),
            ops: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
        }
    }

    /// Records one completed request that was sent at `sent`.
    pub fn record(&mut self, sent: Instant, now: Instant, bytes: usize) {
        let ns = now.saturating_duration_since(sent).as_nanos().max(1) as u64;
        self.latency_ns.saturating_record(ns);
        self.ops += 1;
        self.bytes += bytes as u64;
    }
}

/// Tracks a run's limit so every contender stops at the same point.
pub struct Deadline {
    limit: Limit,
    started: Instant,
    issued: u64,
}

impl Deadline {
    pub fn start(limit: Limit) -> Deadline {
        Deadline {
            limit,
            started: Instant::now(),
            issued: 0,
        }
    }

    /// Whether another request may be issued; counts it if so.
    pub fn issue(&mut self) -> bool {
        let more = match self.limit {
            Limit::Iters(n) => self.issued < n,
            Limit::Duration(d) => self.started.elapsed() < d,
        };
        if more {
            self.issued += 1;
        }
        more
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Parses a size as fio writes them: `4096`, `4k`, `512M`, `1G`, `1GiB`
/// (binary multiples; case does not matter).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 4096, 4k, 512M, 1G)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use k, M, G or T)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A size for people: `4 KiB`, `256 MiB`, `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A progress line on stderr for slow untimed steps (formatting, laying out):
/// a percentage rewritten in place on a terminal, a start and an end line
/// otherwise (so logs do not fill with carriage returns).
pub struct Progress {
    what: String,
    tty: bool,
    shown: Option<u64>,
    started: Instant,
}

impl Progress {
    pub fn start(what: impl Into<String>) -> Progress {
        let what = what.into();
        let tty = std::io::stderr().is_terminal();
        if !tty {
            eprintln!("{what} ...");
        }
        Progress {
            what,
            tty,
            shown: None,
            started: Instant::now(),
        }
    }

    /// `done` of `total` steps are done.
    pub fn update(&mut self, done: u64, total: u64) {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        if self.tty && self.shown != Some(percent) {
            self.shown = Some(percent);
            let mut err = std::io::stderr().lock();
            // Progress is best effort: a closed stderr must not fail the bench.
            let _ = write!(err, "\r{}: {percent:3}%", self.what);
            let _ = err.flush();
        }
    }

    pub fn finish(self) {
        let secs = self.started.elapsed().as_secs_f64();
        if self.tty {
            eprintln!("\r{}: done in {secs:.1} s", self.what);
        } else {
            eprintln!("{}: done in {secs:.1} s", self.what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_fio() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size(" 2g "), Ok(2 << 30));
        for bad in [
            "",
            "k",
            "1.5G",
            "4x",
            "-4k",
            "99999999999999999999",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}
