//! The `pipeline` baseline of `bench replication`: the replicated write with
//! nothing but its messages and its durable writes, as this machine runs
//! them. A client thread sends each block to a leader thread over loopback
//! TCP; the leader forwards it to two follower threads, writes it to its own
//! file (O_DIRECT) and makes it durable, and answers the client once it and
//! one follower hold it durably; each follower writes and flushes the same
//! way and acknowledges with one byte. No Raft, no framing, no event loop:
//! blocking sockets and synchronous writes, so every hop pays the wake-up a
//! sleeping thread pays, as the fabric with `spin_us = 0` does.
//!
//! It is the floor for the shape of the work on this machine: three durable
//! writes sharing one disk and four sleeping hops sharing the cores, which
//! the `chunkstore` and `fabric` baselines (each alone on the machine) leave
//! out. Measured at iodepth 1 only.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;
use std::time::Instant;

use anyhow::Context;
use quiver_chunkstore::flush::DeviceFlush;
use quiver_chunkstore::uring::open_direct;

use super::baseline::loopback_pair;
use super::{Deadline, Limit, RunStats};

/// Bytes of each replica's file: blocks are written round-robin over it.
const FILE_BYTES: u64 = 4 << 20;

/// One replica's log: a pre-written file and how its writes are made durable.
struct Replica {
    file: File,
    flush: Option<DeviceFlush>,
    blocks: u64,
    written: u64,
    buf: Vec<u8>,
    bs: usize,
}

impl Replica {
    /// Opens (and writes through once, so no write changes its block map)
    /// `dir/name`; durable by one device flush where that covers the file,
    /// else by fdatasync, as the chunk store decides.
    fn open(dir: &Path, name: &str, bs: usize, device_flush: bool) -> anyhow::Result<Replica> {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let file = open_direct(&path, true, "the pipeline baseline")
            .with_context(|| format!("creating {}", path.display()))?;
        let blocks = (FILE_BYTES / bs as u64).max(1);
        let mut replica = Replica {
            file,
            flush: None,
            blocks,
            written: 0,
            buf: vec![0; bs + quiver_chunkstore::PAGE_BYTES],
            bs,
        };
        for _ in 0..blocks {
            replica.write_block()?;
        }
        replica.file.sync_all().context("syncing a pipeline file")?;
        if device_flush {
            let flush = DeviceFlush::for_dir(dir)?;
            replica.flush = flush.filter(|f| f.covers(&replica.file, blocks * bs as u64));
        }
        Ok(replica)
    }

    /// The page-aligned block O_DIRECT needs.
    fn block(&mut self) -> &mut [u8] {
        let at = self.aligned_at();
        &mut self.buf[at..at + self.bs]
    }

    fn aligned_at(&self) -> usize {
        self.buf
            .as_ptr()
            .align_offset(quiver_chunkstore::PAGE_BYTES)
    }

    /// Writes the block at the next offset (round-robin over the file).
    fn write_block(&mut self) -> anyhow::Result<()> {
        let offset = (self.written % self.blocks) * self.bs as u64;
        self.written += 1;
        let at = self.aligned_at();
        self.file
            .write_all_at(&self.buf[at..at + self.bs], offset)
            .context("writing a pipeline block")
    }

    /// Writes `request` at the next block and makes it durable.
    fn append(&mut self, request: &[u8]) -> anyhow::Result<()> {
        self.block().copy_from_slice(request);
        self.write_block()?;
        match &self.flush {
            Some(flush) => flush.flush()?,
            None => self.file.sync_data().context("fdatasync")?,
        }
        Ok(())
    }
}

/// Reads one request, or `None` at end of stream.
fn read_request(from: &mut TcpStream, into: &mut [u8]) -> anyhow::Result<Option<()>> {
    match from.read_exact(into) {
        Ok(()) => Ok(Some(())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e).context("reading a request"),
    }
}

fn follower(mut leader: TcpStream, mut replica: Replica) -> anyhow::Result<()> {
    let mut request = vec![0; replica.bs];
    while read_request(&mut leader, &mut request)?.is_some() {
        replica.append(&request)?;
        leader.write_all(&[1]).context("acknowledging")?;
    }
    Ok(())
}

/// Blocks until `needed` followers have acknowledged `round` requests,
/// counting every acknowledgement that has arrived.
fn await_acks(
    followers: &mut [TcpStream],
    acked: &mut [u64],
    round: u64,
    needed: usize,
) -> anyhow::Result<()> {
    let mut bytes = [0u8; 64];
    while acked.iter().filter(|&&a| a >= round).count() < needed {
        let mut fds: Vec<libc::pollfd> = followers
            .iter()
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents != 0 {
                let n = followers[i].read(&mut bytes).context("reading acks")?;
                anyhow::ensure!(n > 0, "a follower hung up");
                acked[i] += n as u64;
            }
        }
    }
    Ok(())
}

fn leader(
    mut client: TcpStream,
    mut followers: Vec<TcpStream>,
    mut replica: Replica,
) -> anyhow::Result<()> {
    let mut request = vec![0; replica.bs];
    let mut acked = vec![0u64; followers.len()];
    let mut round = 0;
    while read_request(&mut client, &mut request)?.is_some() {
        round += 1;
        for f in followers.iter_mut() {
            f.write_all(&request).context("forwarding")?;
        }
        replica.append(&request)?;
        await_acks(&mut followers, &mut acked, round, 1)?;
        client.write_all(&[1]).context("answering")?;
    }
    // Every acknowledgement read before the streams close (unread bytes
    // would make the close a reset); then closing them ends the followers.
    let all = followers.len();
    await_acks(&mut followers, &mut acked, round, all)
}

/// Runs the pipeline for `limit` after `warmup` writes, at iodepth 1, with
/// its files in `dir`.
pub fn run(
    dir: &Path,
    bs: usize,
    limit: Limit,
    warmup: u64,
    device_flush: bool,
) -> anyhow::Result<RunStats> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut threads = Vec::new();
    let mut follower_streams = Vec::new();
    for i in 0..2 {
        let replica = Replica::open(dir, &format!("follower{i}"), bs, device_flush)?;
        let (to_follower, at_follower) = loopback_pair()?;
        follower_streams.push(to_follower);
        threads.push(thread::spawn(move || follower(at_follower, replica)));
    }
    let replica = Replica::open(dir, "leader", bs, device_flush)?;
    let (mut client, at_leader) = loopback_pair()?;
    threads.push(thread::spawn(move || {
        leader(at_leader, follower_streams, replica)
    }));

    let mut request = vec![0x5a; bs];
    let mut ack = [0u8; 1];
    let mut write = |request: &mut [u8], n: u64| -> anyhow::Result<()> {
        request[..8].copy_from_slice(&n.to_le_bytes());
        client.write_all(request).context("sending a write")?;
        client.read_exact(&mut ack).context("awaiting its answer")
    };
    for n in 0..warmup {
        write(&mut request, n)?;
    }
    let mut stats = RunStats::new("pipeline", "tcp");
    let mut deadline = Deadline::start(limit);
    let mut n = warmup;
    while deadline.issue() {
        let started = Instant::now();
        write(&mut request, n)?;
        stats.record(started, Instant::now(), bs);
        n += 1;
    }
    stats.elapsed = deadline.elapsed();
    drop(client);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a pipeline thread panicked"))??;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipeline_answers_every_write_and_stops_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let stats = run(dir.path(), 4096, Limit::Iters(50), 5, true).unwrap();
        assert_eq!(stats.ops, 50);
        assert_eq!(stats.latency_ns.len(), 50);
    }
}
