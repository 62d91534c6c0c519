//! Benchmarks a latency user runs: `quiver bench fabric` and its baselines.

pub mod baseline;
pub mod fabric;
pub mod report;

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
