//! The log engine on real files with O_DIRECT and io_uring: appends across
//! groups, truncate, purge and segment deletion, votes, recovery after a torn
//! tail and after kill -9, corruption refused, group commit.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_raft::data::Data;
use quiver_raft::log::{wait_durable, Entry, LogConfig, LogEngine, LogError, LogId, Vote};

fn id(index: u64) -> LogId {
    LogId {
        term: 1 + index / 100,
        node: 7,
        index,
    }
}

fn payload(group: u64, index: u64) -> Data {
    let len = ((group * 131 + index * 17) % 3000) as usize;
    (0..len)
        .map(|i| (i as u64 ^ group ^ index) as u8)
        .collect::<Vec<_>>()
        .into()
}

fn entries(group: u64, from: u64, to: u64) -> Vec<Entry> {
    (from..to)
        .map(|i| Entry {
            id: id(i),
            tag: (i % 200) as u8,
            data: payload(group, i),
        })
        .collect()
}

fn append(log: &LogEngine, group: u64, from: u64, to: u64) {
    wait_durable(|done| log.append(group, entries(group, from, to), done)).unwrap();
}

fn small(dir: &std::path::Path) -> LogConfig {
    LogConfig {
        segment_bytes: 256 << 10,
        write_bytes_max: 64 << 10,
        ..LogConfig::new(dir)
    }
}

/// A fabric arena of one 4 KiB buffer: taken while a log entry holds it.
fn one_buffer_arena() -> quiver_fabric::arena::Arena {
    use quiver_fabric::arena::{Arena, ArenaConfig, SizeClass};
    Arena::new(&ArenaConfig {
        classes: vec![SizeClass {
            buf_bytes: 4096,
            count: 1,
        }],
        huge_pages: false,
    })
    .unwrap()
}

fn check(log: &LogEngine, group: u64, from: u64, to: u64) {
    let got = log.entries(group, from, to).unwrap();
    assert_eq!(
        got,
        entries(group, from, to),
        "group {group} [{from}, {to})"
    );
}

#[test]
fn appends_truncates_votes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = LogEngine::open(small(dir.path())).unwrap();
        append(&log, 1, 1, 50);
        append(&log, 2, 1, 30);
        append(&log, 1, 50, 60);
        // A conflict: group 2 loses 20.. and gets them again from a new leader.
        wait_durable(|done| log.truncate(2, 20, done)).unwrap();
        assert_eq!(log.state(2).last, Some(id(19)));
        append(&log, 2, 20, 25);
        let vote = Vote {
            term: 4,
            node: 2,
            committed: true,
        };
        wait_durable(|done| log.save_vote(1, vote, done)).unwrap();
        wait_durable(|done| log.save_committed(1, id(42), done)).unwrap();
        // Not contiguous: refused, nothing changes.
        let err = log
            .append(1, entries(1, 70, 71), Box::new(|_| {}))
            .unwrap_err();
        assert!(
            matches!(err, LogError::NotContiguous { index: 70, .. }),
            "{err}"
        );
        // Starting before the end replaces the tail, durably.
        append(&log, 2, 24, 26);
        // A noted committed id has no write of its own: it rides along with
        // the next append (group 2's, here).
        log.note_committed(2, id(21)).unwrap();
        assert_eq!(log.committed(2), Some(id(21)));
        append(&log, 2, 26, 27);
    }
    let log = LogEngine::open(small(dir.path())).unwrap();
    check(&log, 1, 1, 60);
    check(&log, 2, 1, 27);
    assert_eq!(log.state(1).last, Some(id(59)));
    assert_eq!(log.state(2).last, Some(id(26)));
    assert_eq!(log.committed(2), Some(id(21)));
    assert_eq!(
        log.vote(1),
        Some(Vote {
            term: 4,
            node: 2,
            committed: true
        })
    );
    assert_eq!(log.committed(1), Some(id(42)));
    assert_eq!(log.vote(2), None);
}

#[test]
fn purged_segments_are_deleted_and_the_rest_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let segments = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count()
    };
    {
        let log = LogEngine::open(small(dir.path())).unwrap();
        for round in 0..20 {
            append(&log, 1, 1 + round * 20, 21 + round * 20);
            append(&log, 2, 1 + round * 20, 21 + round * 20);
        }
        let before = segments();
        assert!(
            before > 3,
            "{before} segments for 800 entries of up to 3 KB"
        );
        wait_durable(|done| log.purge(1, id(300), done)).unwrap();
        assert_eq!(segments(), before, "group 2 still needs them");
        wait_durable(|done| log.purge(2, id(350), done)).unwrap();
        // Deletion runs after the next write.
        append(&log, 1, 401, 402);
        assert!(segments() < before, "{} of {before} left", segments());
        let stats = log.stats();
        assert!(stats.segments_deleted + stats.segments_recycled > 0);
        assert!(stats.segments_recycled <= quiver_raft::log::FREE_SEGMENTS_MAX as u64);
        assert_eq!(log.state(1).purged, Some(id(300)));
        check(&log, 1, 301, 402);
    }
    let log = LogEngine::open(small(dir.path())).unwrap();
    assert_eq!(log.state(1).purged, Some(id(300)));
    assert_eq!(log.state(2).purged, Some(id(350)));
    check(&log, 1, 301, 402);
    check(&log, 2, 351, 401);
    assert!(log.entries(1, 1, 301).unwrap().is_empty());
}

/// The last batch torn on disk: recovery keeps everything before it, and
/// appends after recovery survive the next reopen (no stale bytes return).
#[test]
fn a_torn_tail_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = LogEngine::open(small(dir.path())).unwrap();
        append(&log, 1, 1, 10);
        append(&log, 1, 10, 20);
    }
    let seg = last_segment(dir.path());
    let bytes = std::fs::read(&seg).unwrap();
    // The second append's batch starts at the last non-zero page.
    let last_page = (0..bytes.len() / 4096)
        .rev()
        .find(|&p| bytes[p * 4096..(p + 1) * 4096].iter().any(|&b| b != 0))
        .unwrap();
    let mut torn = bytes.clone();
    torn[last_page * 4096 + 100] ^= 0xff;
    std::fs::write(&seg, &torn).unwrap();
    {
        let log = LogEngine::open(small(dir.path())).unwrap();
        let last = log.state(1).last.unwrap().index;
        assert!((9..19).contains(&last), "kept up to {last}");
        check(&log, 1, 1, last + 1);
        append(&log, 1, last + 1, last + 4);
    }
    let log = LogEngine::open(small(dir.path())).unwrap();
    let last = log.state(1).last.unwrap().index;
    check(&log, 1, 1, last + 1);
}

#[test]
fn corruption_before_the_tail_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = LogEngine::open(small(dir.path())).unwrap();
        for round in 0..10 {
            append(&log, 1, 1 + round * 30, 31 + round * 30);
        }
    }
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 2);
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[4096 + 60] ^= 1;
    std::fs::write(&segs[0], &bytes).unwrap();
    match LogEngine::open(small(dir.path())) {
        Err(LogError::Corrupt { .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a corrupt segment was accepted"),
    }
}

#[test]
fn concurrent_appenders_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(LogEngine::open(LogConfig::new(dir.path())).unwrap());
    const GROUPS: u64 = 8;
    const APPENDS: u64 = 100;
    let threads: Vec<_> = (0..GROUPS)
        .map(|group| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 1..=APPENDS {
                    append(&log, group, i, i + 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = log.stats();
    eprintln!("{stats:?}");
    assert_eq!(stats.requests, GROUPS * APPENDS);
    assert!(stats.syncs < stats.requests, "no group commit: {stats:?}");
    for group in 0..GROUPS {
        check(&log, group, 1, APPENDS + 1);
    }
}

const ROLE: &str = "QUIVER_RAFT_LOG_TEST_ROLE";
const DIR: &str = "QUIVER_RAFT_LOG_TEST_DIR";

/// The appender killed by the parent: appends to 4 groups from where the log
/// ends, printing `ack GROUP INDEX` once each append is durable.
#[test]
fn crash_appender_child() {
    if std::env::var(ROLE).as_deref() != Ok("appender") {
        return;
    }
    let dir = std::env::var(DIR).unwrap();
    let log = LogEngine::open(small(dir.as_ref())).unwrap();
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let mut next: HashMap<u64, u64> = (0..4)
        .map(|g| (g, log.state(g).last.map_or(1, |l| l.index + 1)))
        .collect();
    // Durable appends per group, for purging only what is durable (as Raft
    // purges only what it applied).
    let durable: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new(
        (0..4)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect(),
    );
    for n in 0..100_000u64 {
        let group = n % 4;
        let index = next[&group];
        next.insert(group, index + 1);
        let out = Arc::clone(&out);
        let acked = Arc::clone(&durable);
        log.append(
            group,
            entries(group, index, index + 1),
            Box::new(move |r| {
                if r.is_ok() {
                    acked[group as usize].fetch_max(index, std::sync::atomic::Ordering::Relaxed);
                    let mut out = out.lock().unwrap();
                    let _ = writeln!(out, "ack {group} {index}");
                    let _ = out.flush();
                }
            }),
        )
        .unwrap();
        if n % 64 == 0 {
            // Let batches of different sizes form.
            std::thread::sleep(Duration::from_micros(200));
        }
        if n % 512 == 511 {
            // Purge all but the last 100 durable entries of each group, so
            // segments retire and are reused while the parent kills us.
            for g in 0..4u64 {
                let upto = durable[g as usize].load(std::sync::atomic::Ordering::Relaxed);
                if upto > 100 {
                    log.purge(g, id(upto - 100), Box::new(|_| {})).unwrap();
                }
            }
        }
    }
}

#[test]
fn acknowledged_appends_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    for round in 0..8u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_appender_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, "appender")
            .env(DIR, dir.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kill_after = 50 + round * 97;
        let started = Instant::now();
        let mut seen = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("ack ") {
                let mut it = rest.split(' ').map(|x| x.parse::<u64>().unwrap());
                let (g, i) = (it.next().unwrap(), it.next().unwrap());
                let a = acked.entry(g).or_default();
                *a = (*a).max(i);
                seen += 1;
            }
            if seen >= kill_after || started.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        for line in lines {
            if let Some(rest) = line.unwrap().strip_prefix("ack ") {
                let mut it = rest.split(' ').map(|x| x.parse::<u64>().unwrap());
                let (g, i) = (it.next().unwrap(), it.next().unwrap());
                let a = acked.entry(g).or_default();
                *a = (*a).max(i);
            }
        }
        let log = LogEngine::open(small(dir.path()))
            .unwrap_or_else(|e| panic!("round {round}: reopening after kill -9: {e}"));
        for (&g, &a) in &acked {
            let state = log.state(g);
            let last = state.last.map_or(0, |l| l.index);
            assert!(
                last >= a,
                "round {round}: group {g} acknowledged {a}, log ends at {last}"
            );
            let first = state.purged.map_or(1, |p| p.index + 1);
            check(&log, g, first, last + 1);
        }
        eprintln!("round {round}: acknowledged {acked:?}, {:?}", log.stats());
    }
    assert!(
        acked.values().sum::<u64>() > 1000,
        "the appender barely ran: {acked:?}"
    );
}

/// The segment files, oldest first (not the spare being prepared).
fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs
}

fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    segment_files(dir).pop().unwrap()
}

/// A roll to a new segment puts every group's vote, committed id and purge
/// point in front of the bytes waiting to be written: the write must be
/// padded for all of it. (It was padded for the waiting bytes alone, and the
/// writer thread panicked when the metadata pushed them past a page.)
#[test]
fn a_roll_with_metadata_in_front_of_a_write_keeps_the_log_going() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 64 << 10,
        ..small(dir.path())
    };
    let groups = 40;
    let mut next = vec![1u64; groups as usize];
    {
        let log = LogEngine::open(config.clone()).unwrap();
        for g in 0..groups {
            let vote = Vote {
                term: 3,
                node: 7,
                committed: true,
            };
            wait_durable(|done| log.save_vote(g, vote, done)).unwrap();
        }
        // Writes of many sizes, so some roll with their bytes ending just
        // short of a page boundary.
        for round in 0..400u64 {
            let g = round % groups;
            let i = next[g as usize];
            append(&log, g, i, i + 1 + round % 3);
            next[g as usize] = i + 1 + round % 3;
        }
        for g in 0..groups {
            check(&log, g, 1, next[g as usize]);
        }
    }
    let log = LogEngine::open(config).unwrap();
    for g in 0..groups {
        check(&log, g, 1, next[g as usize]);
        assert_eq!(log.vote(g).map(|v| v.term), Some(3));
    }
}

/// Retired segments become new ones (no zero fill), and the records of their
/// earlier life never come back: every reopen finds exactly what was written
/// since, though each reused file still holds its old bytes past the tail.
#[test]
fn retired_segments_are_reused_and_their_old_records_never_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = small(dir.path());
    let (mut next, mut reused) = (1u64, 0u64);
    for _round in 0..10 {
        let log = LogEngine::open(config.clone()).unwrap();
        // About a segment and a half of entries, then purge all but ten.
        let to = next + 200;
        append(&log, 1, next, to);
        wait_durable(|done| log.purge(1, id(to - 11), done)).unwrap();
        // Retirement runs after the next write.
        append(&log, 1, to, to + 1);
        check(&log, 1, to - 10, to + 1);
        next = to + 1;
        reused += log.stats().segments_reused;
        drop(log);
        let log = LogEngine::open(config.clone()).unwrap();
        assert_eq!(log.state(1).last, Some(id(next - 1)));
        assert_eq!(log.state(1).purged, Some(id(next - 12)));
        check(&log, 1, next - 11, next);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files <= 8, "{files} files in the log directory");
    }
    assert!(reused > 0, "no segment was reused");
}

#[test]
fn applied_entries_leave_memory_and_read_back_from_their_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogEngine::open(small(dir.path())).unwrap();
    // Several segments' worth (256 KiB each), so reads cross rolls.
    append(&log, 1, 1, 601);
    append(&log, 2, 1, 101);
    let held = |g| log.held_bytes(g);
    let all: u64 = entries(1, 1, 601).iter().map(|e| e.data.len() as u64).sum();
    assert_eq!(held(1), all, "nothing released yet: all in memory");
    log.release(1, 400);
    let rest: u64 = entries(1, 401, 601)
        .iter()
        .map(|e| e.data.len() as u64)
        .sum();
    assert_eq!(held(1), rest);
    check(&log, 1, 1, 601);
    check(&log, 1, 390, 410);
    check(&log, 2, 1, 101);
    // A truncate, then appends again: new entries are held until released.
    wait_durable(|done| log.truncate(1, 350, done)).unwrap();
    append(&log, 1, 350, 451);
    assert!(held(1) > 0);
    check(&log, 1, 340, 451);
    log.release(1, 450);
    assert_eq!(held(1), 0);
    check(&log, 1, 1, 451);
    drop(log);
    // After a restart every entry is on disk only.
    let log = LogEngine::open(small(dir.path())).unwrap();
    assert_eq!(log.held_bytes(1), 0);
    check(&log, 1, 1, 451);
    check(&log, 2, 1, 101);
}

#[test]
fn applied_entries_keep_the_newest_few_in_memory_within_their_cap() {
    use quiver_raft::log::{KEPT_APPLIED_BYTES, KEPT_APPLIED_ENTRIES};
    let dir = tempfile::tempdir().unwrap();
    let log = LogEngine::open(small(dir.path())).unwrap();
    let bytes = |from, to| -> u64 {
        entries(1, from, to)
            .iter()
            .map(|e| e.data.len() as u64)
            .sum()
    };
    // From index 0 (openraft's first entry), fewer than the kept number.
    append(&log, 1, 0, 10);
    log.applied(1, 9);
    // (Index 0 counts as released from the start, as before.)
    assert_eq!(log.held_bytes(1), bytes(1, 10), "all are the newest");
    // Small entries: the newest KEPT_APPLIED_ENTRIES stay.
    append(&log, 1, 10, 200);
    log.applied(1, 150);
    let kept_from = 151 - KEPT_APPLIED_ENTRIES;
    assert_eq!(log.held_bytes(1), bytes(kept_from, 200));
    check(&log, 1, 0, 200);
    // Large entries: only as many as fit in KEPT_APPLIED_BYTES.
    let big = (KEPT_APPLIED_BYTES / 4) as usize;
    let large: Vec<Entry> = (200..210)
        .map(|i| Entry {
            id: id(i),
            tag: 1,
            data: vec![i as u8; big].into(),
        })
        .collect();
    wait_durable(|done| log.append(1, large, done)).unwrap();
    log.applied(1, 209);
    // Each payload is the data and a tag byte: three fit, not four.
    assert_eq!(log.held_bytes(1), 3 * big as u64);
    assert_eq!(log.entries(1, 199, 210).unwrap().len(), 11);
}

#[test]
fn a_kept_applied_entry_gives_its_fabric_buffer_back() {
    let arena = one_buffer_arena();
    let dir = tempfile::tempdir().unwrap();
    let log = LogEngine::open(small(dir.path())).unwrap();
    let mut buf = arena.alloc(3000).unwrap();
    buf.fill(9);
    let entry = Entry {
        id: id(1),
        tag: 1,
        data: Data::from(buf.freeze()),
    };
    wait_durable(|done| log.append(1, vec![entry], done)).unwrap();
    assert!(arena.alloc(100).is_err(), "the log holds the only buffer");
    log.applied(1, 1);
    assert!(arena.alloc(100).is_ok(), "a kept entry is a copy");
    let kept = log.entries_in_memory(1, 1, 2).expect("kept in memory");
    assert_eq!(&kept[0].data[..], &[9u8; 3000][..]);
}

#[test]
fn a_released_entrys_fabric_buffer_goes_back_to_the_fabric() {
    let arena = one_buffer_arena();
    let dir = tempfile::tempdir().unwrap();
    let log = LogEngine::open(small(dir.path())).unwrap();
    let mut buf = arena.alloc(3000).unwrap();
    buf.fill(7);
    let entry = Entry {
        id: id(1),
        tag: 1,
        data: Data::from(buf.freeze()),
    };
    wait_durable(|done| log.append(1, vec![entry.clone()], done)).unwrap();
    let held = log.entries(1, 1, 2).unwrap();
    assert!(held[0].data.fabric_buf().is_some(), "held as it came");
    drop((entry, held));
    assert!(arena.alloc(100).is_err(), "the log holds the only buffer");
    log.release(1, 1);
    assert!(arena.alloc(100).is_ok(), "released");
    let back = log.entries(1, 1, 2).unwrap();
    assert_eq!(&back[0].data[..], &[7u8; 3000][..]);
    assert!(back[0].data.fabric_buf().is_none());
}

/// A crash tears a batch after its first page: the good records before the
/// torn one stay, and the torn bytes in their page must not be read as
/// corruption once a later segment makes this one an earlier segment.
#[test]
fn a_batch_torn_after_its_first_page_still_opens_after_a_roll() {
    let dir = tempfile::tempdir().unwrap();
    let first_batch_end;
    {
        let log = LogEngine::open(small(dir.path())).unwrap();
        append(&log, 1, 1, 10);
        let bytes = std::fs::read(last_segment(dir.path())).unwrap();
        first_batch_end = (0..bytes.len() / 4096)
            .rev()
            .find(|&p| bytes[p * 4096..(p + 1) * 4096].iter().any(|&b| b != 0))
            .unwrap()
            + 1;
        append(&log, 1, 10, 30);
    }
    let seg = last_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    // A byte in the second page of the second batch.
    bytes[(first_batch_end + 1) * 4096 + 100] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let last;
    {
        let log = LogEngine::open(small(dir.path())).unwrap();
        last = log.state(1).last.unwrap().index;
        // Enough to roll the segment (256 KiB).
        let mut i = last + 1;
        while i < last + 400 {
            append(&log, 1, i, i + 20);
            i += 20;
        }
    }
    match LogEngine::open(small(dir.path())) {
        Ok(log) => check(&log, 1, 1, last + 400),
        Err(e) => panic!("reopen after a roll: {e}"),
    }
}

#[test]
fn an_entry_over_the_record_limit_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogEngine::open(small(dir.path())).unwrap();
    let huge = Entry {
        id: id(1),
        tag: 1,
        data: Data::from(vec![0u8; quiver_raft::log::record::PAYLOAD_BYTES_MAX]),
    };
    let refused = log.append(1, vec![huge], Box::new(|_| {}));
    assert!(
        matches!(refused, Err(LogError::TooLarge { index: 1, .. })),
        "{refused:?}"
    );
    append(&log, 1, 1, 3);
    check(&log, 1, 1, 3);
}

/// The chunkserver's way: the writer as a task on the caller's
/// current-thread runtime. Durability is awaited, other tasks run while the
/// writes are in flight (the thread is not blocked on the ring), and
/// segments roll under it; what it wrote reads back after a reopen.
#[test]
fn a_writer_on_the_callers_runtime_does_not_block_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const APPENDS: u64 = 300;
    runtime.block_on(async {
        let config = LogConfig {
            runtime: Some(tokio::runtime::Handle::current()),
            ..small(dir.path())
        };
        let log = LogEngine::open(config).unwrap();
        let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ticker = tokio::spawn({
            let ticks = Arc::clone(&ticks);
            async move {
                loop {
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        });
        for i in 1..=APPENDS {
            append_async(&log, 1, i, i + 1).await;
        }
        ticker.abort();
        let stats = log.stats();
        assert_eq!(stats.requests, APPENDS, "{stats:?}");
        let segments = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|d| {
                let name = d.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with("log-") && name.ends_with(".seg")
            })
            .count();
        assert!(segments > 1, "no segment rolled: {segments} segment(s)");
        // Blocked on the ring, the thread would run the ticker about once
        // per append; here it ran it over a hundred times per append.
        let ticks = ticks.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            ticks >= 4 * APPENDS,
            "{ticks} ticks over {APPENDS} appends: the runtime's thread was blocked while they were in flight"
        );
    });
    // Dropping the runtime drops the writer's task with it.
    drop(runtime);
    let log = LogEngine::open(small(dir.path())).unwrap();
    check(&log, 1, 1, APPENDS + 1);
}

/// Stopping a writer that runs as a task waits for it: what was queued
/// before is durable, later appends fail, and the log reopens at once in
/// the same runtime with no other writer on its files.
#[test]
fn stopping_a_task_writer_waits_for_it_and_the_log_reopens_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const APPENDS: u64 = 100;
    runtime.block_on(async {
        let config = || LogConfig {
            runtime: Some(tokio::runtime::Handle::current()),
            ..small(dir.path())
        };
        let log = LogEngine::open(config()).unwrap();
        // All queued before the stop, none waited for.
        let mut durable = Vec::new();
        for i in 1..=APPENDS {
            durable.push(append_queued(&log, 1, i, i + 1).unwrap());
        }
        log.stop().await;
        for (i, mut rx) in durable.into_iter().enumerate() {
            let r = rx.try_recv();
            assert!(
                matches!(r, Ok(Ok(()))),
                "append {} not durable when stop returned: {r:?}",
                i + 1
            );
        }
        let failed = match append_queued(&log, 1, APPENDS + 1, APPENDS + 2) {
            Err(_) => true,
            Ok(rx) => !matches!(rx.await, Ok(Ok(()))),
        };
        assert!(failed, "an append after stop succeeded");
        let reopened = LogEngine::open(config()).unwrap();
        check(&reopened, 1, 1, APPENDS + 1);
        append_async(&reopened, 1, APPENDS + 1, APPENDS + 10).await;
        check(&reopened, 1, 1, APPENDS + 10);
        reopened.stop().await;
        drop(log);
    });
}

/// Queues an append on a log whose writer is a task; the receiver says
/// when it is durable.
fn append_queued(
    log: &LogEngine,
    group: u64,
    from: u64,
    to: u64,
) -> Result<tokio::sync::oneshot::Receiver<Result<(), LogError>>, LogError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    log.append(
        group,
        entries(group, from, to),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    )?;
    Ok(rx)
}

async fn append_async(log: &LogEngine, group: u64, from: u64, to: u64) {
    append_queued(log, group, from, to)
        .unwrap()
        .await
        .unwrap()
        .unwrap();
}
