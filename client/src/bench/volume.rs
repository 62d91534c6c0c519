//! `quiver bench volume`: random IO on a volume through the volume library,
//! `iodepth` requests in flight, with self-describing blocks when verifying.
//!
//! A verified block holds its offset, a generation and a checksum; every
//! read checks all three, and that the generation is no older than the
//! newest write to that block acknowledged before the read was issued. No
//! two requests touch one block at once, so that check is exact.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use quiver_client::Volume;
use rand::Rng;

use super::{Progress, RunStats};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VolumePattern {
    Randwrite,
    Randread,
    /// Random reads and writes, half each.
    Rw,
}

impl VolumePattern {
    pub fn name(self) -> &'static str {
        match self {
            VolumePattern::Randwrite => "randwrite",
            VolumePattern::Randread => "randread",
            VolumePattern::Rw => "rw",
        }
    }
}

#[derive(Debug, Clone)]
pub struct VolumeWorkload {
    pub pattern: VolumePattern,
    pub bs: usize,
    pub iodepth: usize,
    pub duration: Duration,
    /// Bytes of the volume the offsets range over (from its start).
    pub working_set: u64,
    pub verify: bool,
}

/// What a run measured, and what verification saw.
pub struct VolumeRun {
    pub stats: RunStats,
    pub verified_reads: u64,
}

const MAGIC: u64 = 0x5155_4956_4552_5631; // "QUIVERV1"
/// Header of a verified block: magic, offset, generation, crc32c of the rest.
const HEADER_BYTES: usize = 32;

/// The contents of block `offset` at `generation`.
fn block(offset: u64, generation: u64, bs: usize) -> Vec<u8> {
    let mut out = vec![0u8; bs];
    let mut state = offset ^ generation.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    for word in out[HEADER_BYTES..].chunks_mut(8) {
        // xorshift: cheap bytes that differ per block and generation.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
    let crc = crc32c::crc32c(&out[HEADER_BYTES..]);
    out[..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&offset.to_le_bytes());
    out[16..24].copy_from_slice(&generation.to_le_bytes());
    out[24..32].copy_from_slice(&u64::from(crc).to_le_bytes());
    out
}

/// Checks a block read at `offset`: its generation, or what is wrong.
fn check_block(data: &[u8], offset: u64) -> Result<u64, String> {
    let word = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return Err(format!(
            "block at {offset}: no block header (never written?)"
        ));
    }
    if word(1) != offset {
        return Err(format!(
            "block at {offset} holds the block of offset {}",
            word(1)
        ));
    }
    if word(3) != u64::from(crc32c::crc32c(&data[HEADER_BYTES..])) {
        return Err(format!(
            "block at {offset}: checksum mismatch (torn or corrupt)"
        ));
    }
    Ok(word(2))
}

struct Shared {
    volume: Volume,
    w: VolumeWorkload,
    blocks: u64,
    /// Per block: newest acknowledged generation.
    acked: Vec<AtomicU64>,
    busy: Vec<AtomicBool>,
    next_generation: AtomicU64,
}

impl Shared {
    /// Claims a random block no other request is using.
    fn claim(&self, rng: &mut impl Rng) -> u64 {
        loop {
            let b = rng.random_range(0..self.blocks);
            if !self.busy[b as usize].swap(true, Ordering::AcqRel) {
                return b;
            }
        }
    }

    fn release(&self, b: u64) {
        self.busy[b as usize].store(false, Ordering::Release);
    }

    async fn write(&self, b: u64) -> anyhow::Result<()> {
        let offset = b * self.w.bs as u64;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let data = if self.w.verify {
            block(offset, generation, self.w.bs)
        } else {
            vec![(generation & 0xff) as u8; self.w.bs]
        };
        self.volume
            .write_at(offset, &data)
            .await
            .with_context(|| format!("write at {offset}"))?;
        self.acked[b as usize].fetch_max(generation, Ordering::AcqRel);
        Ok(())
    }

    /// A read; with verification, returns whether a block was checked.
    async fn read(&self, b: u64) -> anyhow::Result<bool> {
        let offset = b * self.w.bs as u64;
        let acked_before = self.acked[b as usize].load(Ordering::Acquire);
        let mut buf = vec![0u8; self.w.bs];
        self.volume
            .read_at(offset, &mut buf)
            .await
            .with_context(|| format!("read at {offset}"))?;
        if !self.w.verify || acked_before == 0 {
            return Ok(false);
        }
        let generation = check_block(&buf, offset).map_err(|e| anyhow::anyhow!("verify: {e}"))?;
        anyhow::ensure!(
            generation >= acked_before,
            "verify: block at {offset} went back to generation {generation} after {acked_before} was acknowledged"
        );
        Ok(true)
    }
}

/// Writes every block of the working set once (reads need data), with a
/// progress line.
async fn lay_out(shared: &Arc<Shared>) -> anyhow::Result<()> {
    let progress = Mutex::new(Progress::start(format!(
        "laying out {} of volume {}",
        super::format_size(shared.w.working_set),
        shared.volume.name()
    )));
    let next = Arc::new(AtomicU64::new(0));
    let workers = (0..shared.w.iodepth.max(1)).map(|_| {
        let (shared, next) = (shared.clone(), next.clone());
        let progress = &progress;
        async move {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= shared.blocks {
                    return anyhow::Ok(());
                }
                shared.write(b).await?;
                if b % 256 == 0 {
                    progress.lock().expect("progress").update(b, shared.blocks);
                }
            }
        }
    });
    futures::future::try_join_all(workers).await?;
    progress.into_inner().expect("progress").finish();
    Ok(())
}

/// Runs the workload on `volume` (opened for writing unless the pattern
/// only reads).
pub async fn run(volume: Volume, w: VolumeWorkload) -> anyhow::Result<VolumeRun> {
    anyhow::ensure!(
        w.bs > 0 && w.iodepth > 0,
        "--bs and --iodepth must be positive"
    );
    anyhow::ensure!(
        !w.verify || w.bs >= HEADER_BYTES,
        "--verify needs blocks of at least {HEADER_BYTES} bytes"
    );
    let working_set = w.working_set.min(volume.size());
    let blocks = working_set / w.bs as u64;
    anyhow::ensure!(
        blocks as usize > w.iodepth,
        "the working set ({working_set} bytes) needs more blocks of {} than --iodepth",
        w.bs
    );
    let shared = Arc::new(Shared {
        blocks,
        acked: (0..blocks).map(|_| AtomicU64::new(0)).collect(),
        busy: (0..blocks).map(|_| AtomicBool::new(false)).collect(),
        next_generation: AtomicU64::new(1),
        w: VolumeWorkload {
            working_set,
            ..w.clone()
        },
        volume,
    });
    if w.pattern != VolumePattern::Randwrite {
        lay_out(&shared).await?;
    }
    let started = Instant::now();
    let transport = "fabric".to_string();
    let workers = (0..w.iodepth).map(|_| {
        let shared = shared.clone();
        let transport = transport.clone();
        async move {
            let mut stats = RunStats::new("quiver", &transport);
            let mut verified = 0u64;
            let mut rng = rand::rng();
            while started.elapsed() < shared.w.duration {
                let b = shared.claim(&mut rng);
                let write = match shared.w.pattern {
                    VolumePattern::Randwrite => true,
                    VolumePattern::Randread => false,
                    VolumePattern::Rw => rng.random_bool(0.5),
                };
                let sent = Instant::now();
                let done = if write {
                    shared.write(b).await.map(|()| false)
                } else {
                    shared.read(b).await
                };
                shared.release(b);
                verified += u64::from(done?);
                stats.record(sent, Instant::now(), shared.w.bs);
            }
            anyhow::Ok((stats, verified))
        }
    });
    let results = futures::future::try_join_all(workers).await?;
    let elapsed = started.elapsed();
    let mut total = RunStats::new("quiver", &transport);
    let mut verified_reads = 0;
    for (stats, verified) in results {
        total
            .latency_ns
            .add(&stats.latency_ns)
            .expect("histograms of one shape");
        total.ops += stats.ops;
        total.bytes += stats.bytes;
        verified_reads += verified;
    }
    total.elapsed = elapsed;
    // With verification, every block written is read back once at the end.
    if w.verify {
        for b in 0..shared.blocks {
            if shared.acked[b as usize].load(Ordering::Acquire) > 0 {
                shared.read(b).await?;
                verified_reads += 1;
            }
        }
    }
    Ok(VolumeRun {
        stats: total,
        verified_reads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_describe_themselves() {
        let b = block(8192, 7, 4096);
        assert_eq!(check_block(&b, 8192), Ok(7));
        assert!(check_block(&b, 4096).unwrap_err().contains("offset 8192"));
        let mut torn = b.clone();
        torn[4000] ^= 1;
        assert!(check_block(&torn, 8192).unwrap_err().contains("checksum"));
        assert!(check_block(&[0; 4096], 0)
            .unwrap_err()
            .contains("never written"));
        assert_ne!(block(8192, 8, 4096), b, "generations differ");
    }
}
