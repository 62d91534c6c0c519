//! 100 copysets on three `quiver chunkserver` processes: all elect leaders,
//! leadership spreads over the servers, and at rest the servers cost little
//! CPU (heartbeats of every copyset share each server's one fabric
//! connection to a peer, its threads and timers).
//!
//! Its own test binary, so no other test competes for the CPU it measures.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{client, peers, start_servers, status_within, Tuning};

const COPYSETS: u32 = 100;

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf with a constant name.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_copysets_elect_leaders_and_idle_cheaply() {
    let root = tempfile::tempdir().unwrap();
    let tuning = Tuning {
        pool_files: 1,
        ..Tuning::default()
    };
    let servers = start_servers(root.path(), 3, &tuning);
    let client = client();
    for s in &servers {
        status_within(&client, s.addr, Duration::from_secs(30)).await;
    }
    let started = Instant::now();
    let members = peers(&servers);
    for c in 1..=COPYSETS {
        client.create_copyset(c, &members).await.unwrap();
    }
    let created = started.elapsed();
    // Every copyset has a leader every server agrees on.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leaders = loop {
        let mut leaders: BTreeMap<u32, u64> = BTreeMap::new();
        let mut agreed = true;
        for s in &servers {
            let st = client.status(s.addr).await.unwrap();
            assert_eq!(st.copysets.len(), COPYSETS as usize);
            for c in st.copysets {
                match (c.leader, leaders.get(&c.copyset)) {
                    (None, _) => agreed = false,
                    (Some(l), Some(&seen)) if l != seen => agreed = false,
                    (Some(l), _) => {
                        leaders.insert(c.copyset, l);
                    }
                }
            }
        }
        if agreed && leaders.len() == COPYSETS as usize {
            break leaders;
        }
        assert!(Instant::now() < deadline, "not all copysets have a leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elected = started.elapsed();
    let mut per_server: BTreeMap<u64, usize> = BTreeMap::new();
    for l in leaders.values() {
        *per_server.entry(*l).or_default() += 1;
    }
    eprintln!(
        "{COPYSETS} copysets created in {created:?}, all led after {elected:?}; leaders per node: {per_server:?}"
    );
    assert_eq!(
        per_server.len(),
        3,
        "some server leads nothing: {per_server:?}"
    );

    // At rest: heartbeats only (100 ms per copyset and follower).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids: Vec<u32> = servers.iter().map(|s| s.pid().unwrap()).collect();
    let before: Vec<f64> = pids.iter().map(|&p| cpu_seconds(p)).collect();
    let window = Duration::from_secs(5);
    tokio::time::sleep(window).await;
    let used: Vec<f64> = pids
        .iter()
        .zip(&before)
        .map(|(&p, b)| (cpu_seconds(p) - b) / window.as_secs_f64())
        .collect();
    eprintln!(
        "idle CPU per server (share of one core): {}",
        used.iter()
            .map(|u| format!("{:.1}%", u * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // 100 copysets x 2 followers x 10 heartbeats/s per leader share; a
    // debug build. Far below a core: nothing spins.
    for (s, u) in servers.iter().zip(&used) {
        assert!(
            *u < 0.5,
            "node {} idles at {:.0}% of a core",
            s.node,
            u * 100.0
        );
    }
}
