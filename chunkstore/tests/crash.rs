//! Crash safety and full disks, with real processes.
//!
//! A child process (this test binary run again, with an environment variable
//! naming its role) writes with `sync`, printing each write when it starts and
//! when it is acknowledged; the parent kills it with SIGKILL at a random
//! moment, reopens the store, and checks every page: an acknowledged write is
//! there (or a later write that was in flight), an in-flight page may be
//! `Corrupt` (caught by its checksum, never returned silently), and the pool
//! is whole.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{key, open, page, tag_of};
use quiver_chunkstore::{IoErrno, StoreError, PAGE_BYTES};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROLE: &str = "QUIVER_CHUNKSTORE_TEST_ROLE";
const DIR: &str = "QUIVER_CHUNKSTORE_TEST_DIR";
const SEED: &str = "QUIVER_CHUNKSTORE_TEST_SEED";
/// Pages the writer picks from, per chunk: few, so pages are overwritten often.
const PAGES_USED: u64 = 48;
const CHUNKS: u64 = 2;
const POOL_FILES: usize = 4;
const IODEPTH: usize = 8;
/// Writes one child does at most if nobody kills it.
const CHILD_WRITES_MAX: u64 = 100_000;

fn child(role: &str, test: &str, dir: &std::path::Path, seed: u64) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DIR, dir)
        .env(SEED, seed.to_string())
        .env_remove("RUST_LOG");
    cmd
}

/// The writer: runs only when the parent starts it.
#[test]
fn crash_writer_child() {
    if std::env::var(ROLE).as_deref() != Ok("writer") {
        return;
    }
    let dir = std::env::var(DIR).unwrap();
    let seed: u64 = std::env::var(SEED).unwrap().parse().unwrap();
    let mut store = open(dir.as_ref(), POOL_FILES);
    for c in 1..=CHUNKS {
        match store.create(key(c), 1) {
            Ok(()) | Err(StoreError::ChunkExists(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let arena = store.arena().clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = std::io::stdout().lock();
    // The harness has printed "test crash_writer_child ... " without a
    // newline; end that line so our first record stands on its own.
    writeln!(out).unwrap();
    let mut in_flight = HashMap::new();
    // Versions are unique across rounds: the seed is the high half.
    let mut version = seed << 32;
    for _ in 0..CHILD_WRITES_MAX {
        while in_flight.len() < IODEPTH {
            version += 1;
            let (c, p) = (
                rng.random_range(1..=CHUNKS),
                rng.random_range(0..PAGES_USED),
            );
            if in_flight.values().any(|&(ic, ip)| (ic, ip) == (c, p)) {
                continue; // one write per page in flight keeps the bookkeeping exact
            }
            writeln!(out, "S {c} {p} {version}").unwrap();
            out.flush().unwrap();
            let mut buf = arena.alloc(PAGE_BYTES).unwrap();
            buf.copy_from_slice(&page(version));
            store
                .submit_write(
                    key(c),
                    1,
                    p * PAGE_BYTES as u64,
                    buf.freeze(),
                    true,
                    version,
                )
                .unwrap();
            in_flight.insert(version, (c, p));
        }
        let done = store.poll(true).unwrap().expect("writes in flight");
        done.result.unwrap();
        let (c, p) = in_flight.remove(&done.token).unwrap();
        writeln!(out, "A {c} {p} {}", done.token).unwrap();
        out.flush().unwrap();
    }
}

#[derive(Default)]
struct PageLog {
    acked: Option<u64>,
    started: BTreeSet<u64>,
}

#[test]
fn acknowledged_writes_survive_kill_9_at_any_moment() {
    let dir = tempfile::tempdir().unwrap();
    let mut log: HashMap<(u64, u64), PageLog> = HashMap::new();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    const ROUNDS: u64 = 12;
    let mut corrupt_seen = 0;
    for round in 1..=ROUNDS {
        let mut writer = child("writer", "crash_writer_child", dir.path(), round)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(writer.stdout.take().unwrap()).lines();
        // Most rounds die mid-stream after some acknowledgements; some die at
        // once, during recovery, pool formatting or chunk creation.
        let early = rng.random_bool(0.25);
        let acks_before_kill = rng.random_range(1..400);
        let started = Instant::now();
        let mut acks = 0;
        if early {
            std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
        } else {
            for line in lines.by_ref() {
                let line = line.unwrap();
                acks += record(&mut log, &line);
                if acks >= acks_before_kill || started.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
        }
        writer.kill().unwrap(); // SIGKILL
        writer.wait().unwrap();
        // What the child printed before it died counts too.
        for line in lines {
            record(&mut log, &line.unwrap());
        }

        let mut store = open(dir.path(), POOL_FILES);
        assert_eq!(
            store.pool_free(),
            POOL_FILES,
            "round {round}: the pool is whole again"
        );
        let chunks = store.list();
        assert!(chunks.len() as u64 <= CHUNKS);
        for (&(c, p), entry) in &log {
            let result = store.read(key(c), p * PAGE_BYTES as u64, PAGE_BYTES);
            let in_flight: Vec<u64> = entry
                .started
                .iter()
                .copied()
                .filter(|&v| entry.acked.is_none_or(|a| v > a))
                .collect();
            match result {
                Ok(bytes) => {
                    let found = if bytes.iter().all(|&b| b == 0) {
                        None
                    } else {
                        tag_of(&bytes)
                    };
                    let ok = found == entry.acked || found.is_some_and(|v| in_flight.contains(&v));
                    assert!(
                        ok,
                        "round {round}: page {c}/{p} holds {found:?}; acknowledged {:?}, in flight {in_flight:?}",
                        entry.acked
                    );
                }
                Err(StoreError::Corrupt { .. }) => {
                    assert!(
                        !in_flight.is_empty(),
                        "round {round}: page {c}/{p} corrupt but its last write was acknowledged"
                    );
                    corrupt_seen += 1;
                }
                Err(StoreError::NoSuchChunk(_)) => {
                    assert!(
                        entry.acked.is_none(),
                        "round {round}: chunk {c} lost with acknowledged data"
                    );
                }
                Err(e) => panic!("round {round}: page {c}/{p}: {e}"),
            }
        }
        drop(store);
    }
    let acked = log.values().filter(|e| e.acked.is_some()).count();
    eprintln!("{ROUNDS} kills; {acked} pages with acknowledged writes checked; {corrupt_seen} torn in-flight pages caught");
    assert!(acked > 0, "the writer never got going");
}

/// Applies one line of the writer's log; returns 1 for an acknowledgement.
fn record(log: &mut HashMap<(u64, u64), PageLog>, line: &str) -> usize {
    // The last four words: a record may follow harness text on the same line.
    let mut parts = line.split(' ').rev();
    let (Some(v), Some(p), Some(c), Some(kind)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return 0; // the test harness's own lines
    };
    let (Ok(c), Ok(p), Ok(v)) = (c.parse::<u64>(), p.parse::<u64>(), v.parse::<u64>()) else {
        return 0;
    };
    let entry = log.entry((c, p)).or_default();
    match kind {
        "S" => {
            entry.started.insert(v);
            0
        }
        "A" => {
            if entry.acked.is_none_or(|a| v > a) {
                entry.acked = Some(v);
            }
            1
        }
        _ => 0,
    }
}

/// The disk-full child: RLIMIT_FSIZE stands in for a full disk.
#[test]
fn disk_full_child() {
    if std::env::var(ROLE).as_deref() != Ok("disk-full") {
        return;
    }
    let dir = std::path::PathBuf::from(std::env::var(DIR).unwrap());
    let mut store = open(&dir, 3);
    store.create(key(1), 1).unwrap();
    store.create(key(2), 1).unwrap();
    store.write(key(1), 1, 0, &page(1), true).unwrap();
    // From here on no file may grow past 1 MiB; the default action of SIGXFSZ
    // (kill) is what a server must not suffer, so it is ignored as a server would.
    // SAFETY: plain libc calls with valid arguments.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    // Writes overwrite preallocated files: a full disk does not stop them.
    store.write(key(1), 1, 4096, &page(2), true).unwrap();
    store.write(key(2), 1, 0, &page(3), true).unwrap();
    // Formatting new pool files does fail, cleanly.
    store.delete(key(2)).unwrap();
    store.create(key(3), 1).unwrap();
    store.create(key(4), 1).unwrap();
    let err = store.replenish().unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Io {
                errno: IoErrno::FileTooLarge,
                ..
            }
        ),
        "{err:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("pool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "half-formatted files left: {leftovers:?}"
    );
    // Running out of pool files is an error, not a hang, and loses nothing.
    assert!(matches!(
        store.create(key(5), 1),
        Err(StoreError::PoolExhausted { .. })
    ));
    let err = store.write(key(1), 2, 0, &page(9), true).unwrap_err();
    assert!(
        matches!(err, StoreError::PoolExhausted { .. }),
        "a snapshot needs a pool file: {err:?}"
    );
    assert_eq!(tag_of(&store.read(key(1), 0, PAGE_BYTES).unwrap()), Some(1));
    assert_eq!(
        tag_of(&store.read(key(1), 4096, PAGE_BYTES).unwrap()),
        Some(2)
    );
    println!("disk-full child: ok");
}

#[test]
fn a_full_disk_gives_clean_errors_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = child("disk-full", "disk_full_child", dir.path(), 0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("disk-full child: ok"),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // And after the "disk" frees up, everything acknowledged is still there.
    let mut store = open(dir.path(), 3);
    assert_eq!(tag_of(&store.read(key(1), 0, PAGE_BYTES).unwrap()), Some(1));
    assert_eq!(
        tag_of(&store.read(key(1), 4096, PAGE_BYTES).unwrap()),
        Some(2)
    );
    assert!(matches!(
        store.read(key(2), 0, PAGE_BYTES),
        Err(StoreError::NoSuchChunk(_))
    ));
}
