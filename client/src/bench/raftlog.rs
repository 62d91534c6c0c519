//! `quiver bench raftlog`: the Raft log engine's durable appends, as copysets
//! make them. `groups` threads each own one Raft group and append one
//! `bs`-byte entry at a time, waiting until it is durable (queue depth 1 per
//! group, as a follower's append is); all share one engine, so their appends
//! meet in its group commit. Latency runs from the append call to the
//! durability callback. The fio baseline is one 4 KiB-style stream writing
//! and fdatasyncing the same block size at queue depth 1: what a log without
//! group commit pays per append.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use quiver_raft::data::Data;
use quiver_raft::log::{Entry, LogConfig, LogEngine, LogId, LogStats};

use super::RunStats;

/// What one run of the log bench did.
pub struct LogRun {
    pub stats: RunStats,
    pub log: LogStats,
}

/// Runs `groups` appenders for `duration` on a fresh log in `dir`.
pub fn run(dir: &Path, groups: u64, bs: usize, duration: Duration) -> anyhow::Result<LogRun> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let engine = Arc::new(LogEngine::open(LogConfig::new(dir)).context("opening the log")?);
    // A payload of `bs` bytes: the tag byte and the data.
    let payload = Data::from(vec![0x5a; bs.saturating_sub(1)]);
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let threads: Vec<_> = (0..groups)
        .map(|group| {
            let engine = Arc::clone(&engine);
            let payload = payload.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<(Instant, Instant)>> {
                let mut times = Vec::new();
                let mut index = 1;
                while Instant::now() < deadline {
                    let (tx, rx) = mpsc::channel();
                    let sent = Instant::now();
                    let entry = Entry {
                        id: LogId {
                            term: 1,
                            node: 1,
                            index,
                        },
                        tag: 1,
                        data: payload.clone(),
                    };
                    engine.append(
                        group,
                        vec![entry],
                        Box::new(move |r| {
                            let _ = tx.send(r);
                        }),
                    )?;
                    rx.recv().context("the log writer stopped")??;
                    times.push((sent, Instant::now()));
                    index += 1;
                }
                Ok(times)
            })
        })
        .collect();
    let mut stats = RunStats::new("quiver", "raft log");
    for t in threads {
        let times = t
            .join()
            .map_err(|_| anyhow::anyhow!("an appender panicked"))??;
        for (sent, done) in times {
            stats.record(sent, done, bs);
        }
    }
    stats.elapsed = started.elapsed();
    let log = engine.stats();
    drop(engine);
    std::fs::remove_dir_all(dir).ok();
    Ok(LogRun { stats, log })
}
