//! The scheduler's decisions, as pure functions of what the control plane
//! knows: which chunkservers answer, who leads each copyset, which
//! copysets have an operation under way. The service carries them out
//! (through heartbeat answers) and rate-limits them.

use std::collections::{HashMap, HashSet};

use crate::meta::Model;
use crate::placement::{pick_replacement, Candidate};

/// An operation on one copyset, sent to its leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Add `add` and remove `remove` in one membership change.
    ChangePeers {
        copyset: u32,
        add: u64,
        remove: u64,
    },
    TransferLeader {
        copyset: u32,
        from: u64,
        to: u64,
    },
}

impl Operation {
    pub fn copyset(&self) -> u32 {
        match self {
            Operation::ChangePeers { copyset, .. } | Operation::TransferLeader { copyset, .. } => {
                *copyset
            }
        }
    }
}

/// Why the scheduler chose an operation (logged, and shown by status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub operation: Operation,
    pub reason: String,
}

/// What the scheduler sees.
pub struct View<'a> {
    pub model: &'a Model,
    pub online: &'a HashSet<u64>,
    /// Copyset → its leader, as last reported.
    pub leaders: &'a HashMap<u32, u64>,
    /// Copysets with an operation under way: left alone.
    pub busy: &'a HashSet<u32>,
    /// Logical pool → physical pool.
    pub physical: &'a HashMap<String, String>,
}

/// Health of one copyset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// A quorum answers but not every member.
    Degraded,
    /// Fewer than a quorum answer, or no leader is known.
    Unavailable,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unavailable => "unavailable",
        }
    }
}

impl View<'_> {
    pub fn health(&self, copyset: u32) -> Health {
        let Some(c) = self.model.copysets.get(&copyset) else {
            return Health::Unavailable;
        };
        let alive = c.peers.iter().filter(|p| self.online.contains(p)).count();
        let led = self
            .leaders
            .get(&copyset)
            .is_some_and(|l| self.online.contains(l) && c.peers.contains(l));
        if alive * 2 <= c.peers.len() || !led {
            Health::Unavailable
        } else if alive < c.peers.len() {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    fn zone(&self, id: u64) -> &str {
        self.model
            .chunkservers
            .get(&id)
            .map_or("", |c| c.zone.as_str())
    }

    /// Online chunkservers of the physical pool under logical pool `pool`.
    fn candidates(&self, pool: &str) -> Vec<Candidate> {
        let physical = self.physical.get(pool).map_or(pool, String::as_str);
        self.model
            .chunkservers
            .values()
            .filter(|c| c.pool == physical && self.online.contains(&c.id))
            .map(|c| Candidate {
                id: c.id,
                zone: c.zone.clone(),
            })
            .collect()
    }
}

/// Chooses at most `limit` operations: first re-replication of copysets
/// with an offline member; only when none is degraded, one copyset move
/// towards even replica counts (a chunkserver joined) and one leader
/// transfer towards even leader counts.
pub fn plan(view: &View, limit: usize) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut load = view.model.copysets_per_chunkserver();
    let mut degraded = false;
    for c in view.model.copysets.values() {
        if out.len() >= limit {
            return out;
        }
        let dead: Vec<u64> = c
            .peers
            .iter()
            .copied()
            .filter(|p| !view.online.contains(p))
            .collect();
        if dead.is_empty() {
            continue;
        }
        degraded = true;
        if view.busy.contains(&c.id) || view.health(c.id) != Health::Degraded || c.epoch == 0 {
            continue;
        }
        let alive: Vec<u64> = c
            .peers
            .iter()
            .copied()
            .filter(|p| view.online.contains(p))
            .collect();
        let used: HashSet<&str> = alive.iter().map(|p| view.zone(*p)).collect();
        let candidates = view.candidates(&c.pool);
        if let Some(target) = pick_replacement(&candidates, &c.peers, &used, &load) {
            *load.entry(target.id).or_default() += 1;
            out.push(Planned {
                operation: Operation::ChangePeers {
                    copyset: c.id,
                    add: target.id,
                    remove: dead[0],
                },
                reason: format!(
                    "chunkserver {} is offline; {} (zone {}) takes its replica",
                    dead[0], target.id, target.zone
                ),
            });
        }
    }
    if degraded || out.len() >= limit || !view.busy.is_empty() {
        return out;
    }
    if let Some(p) = rebalance_replicas(view, &load) {
        out.push(p);
    } else if let Some(p) = balance_leaders(view) {
        out.push(p);
    }
    out
}

/// Moves one replica from the most to the least loaded online chunkserver
/// of a pool when they differ by more than one.
fn rebalance_replicas(view: &View, load: &HashMap<u64, usize>) -> Option<Planned> {
    let pools: HashSet<&str> = view
        .model
        .copysets
        .values()
        .map(|c| c.pool.as_str())
        .collect();
    for pool in pools {
        let candidates = view.candidates(pool);
        let most = candidates.iter().max_by_key(|c| (load[&c.id], c.id))?;
        let least = candidates
            .iter()
            .min_by_key(|c| (load[&c.id], std::cmp::Reverse(c.id)))?;
        if load[&most.id] <= load[&least.id] + 1 {
            continue;
        }
        for c in view.model.pool_copysets(pool) {
            let movable = c.peers.contains(&most.id)
                && !c.peers.contains(&least.id)
                && view.leaders.get(&c.id).is_some_and(|l| *l != most.id)
                && view.health(c.id) == Health::Healthy;
            let others_zones: HashSet<&str> = c
                .peers
                .iter()
                .filter(|p| **p != most.id)
                .map(|p| view.zone(*p))
                .collect();
            if movable && !others_zones.contains(least.zone.as_str()) {
                return Some(Planned {
                    operation: Operation::ChangePeers {
                        copyset: c.id,
                        add: least.id,
                        remove: most.id,
                    },
                    reason: format!(
                        "balance replicas: {} holds {}, {} holds {}",
                        most.id, load[&most.id], least.id, load[&least.id]
                    ),
                });
            }
        }
    }
    None
}

/// Hands one leadership from the chunkserver leading the most copysets to
/// a member leading fewer, when leader counts differ by more than one.
fn balance_leaders(view: &View) -> Option<Planned> {
    let mut led: HashMap<u64, usize> = HashMap::new();
    for c in view.model.copysets.values() {
        for p in &c.peers {
            if view.online.contains(p) {
                led.entry(*p).or_default();
            }
        }
    }
    for (copyset, leader) in view.leaders {
        if view.model.copysets.contains_key(copyset) {
            *led.entry(*leader).or_default() += 1;
        }
    }
    let (&busiest, &most) = led.iter().max_by_key(|(id, n)| (**n, **id))?;
    let fewest = *led.values().min()?;
    if most <= fewest + 1 {
        return None;
    }
    let mut best: Option<(usize, u32, u64)> = None;
    for c in view.model.copysets.values() {
        if view.leaders.get(&c.id) != Some(&busiest) || view.health(c.id) != Health::Healthy {
            continue;
        }
        for p in &c.peers {
            let n = led.get(p).copied().unwrap_or(usize::MAX);
            if *p != busiest && n + 1 < most && best.is_none_or(|(b, _, _)| n < b) {
                best = Some((n, c.id, *p));
            }
        }
    }
    let (n, copyset, to) = best?;
    Some(Planned {
        operation: Operation::TransferLeader {
            copyset,
            from: busiest,
            to,
        },
        reason: format!("balance leaders: {busiest} leads {most}, {to} leads {n}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{Changes, ChunkserverRecord, CopysetRecord};

    struct Cluster {
        model: Model,
        online: HashSet<u64>,
        leaders: HashMap<u32, u64>,
        busy: HashSet<u32>,
        physical: HashMap<String, String>,
    }

    impl Cluster {
        /// Chunkservers as (id, zone); copysets as member lists, led by
        /// their first member.
        fn new(servers: &[(u64, &str)], copysets: &[&[u64]]) -> Cluster {
            let mut c = Changes::default();
            for (id, zone) in servers {
                c.chunkserver(&ChunkserverRecord {
                    id: *id,
                    addr: format!("127.0.0.1:{}", 9000 + id),
                    zone: zone.to_string(),
                    server: format!("host{id}"),
                    pool: "default".into(),
                    capacity_bytes: 1 << 40,
                });
            }
            let mut leaders = HashMap::new();
            for (i, peers) in copysets.iter().enumerate() {
                let id = i as u32 + 1;
                c.copyset(&CopysetRecord {
                    id,
                    pool: "default".into(),
                    peers: peers.to_vec(),
                    epoch: 1,
                });
                leaders.insert(id, peers[0]);
            }
            let mut model = Model::default();
            model.apply(&c.into_batch()).unwrap();
            Cluster {
                model,
                online: servers.iter().map(|(id, _)| *id).collect(),
                leaders,
                busy: HashSet::new(),
                physical: HashMap::new(),
            }
        }

        fn plan(&self, limit: usize) -> Vec<Operation> {
            let view = View {
                model: &self.model,
                online: &self.online,
                leaders: &self.leaders,
                busy: &self.busy,
                physical: &self.physical,
            };
            plan(&view, limit)
                .into_iter()
                .map(|p| p.operation)
                .collect()
        }
    }

    const ZONES4: &[(u64, &str)] = &[(1, "a"), (2, "b"), (3, "c"), (4, "d")];

    #[test]
    fn balanced_cluster_needs_nothing() {
        let c = Cluster::new(ZONES4, &[&[1, 2, 3], &[2, 3, 4], &[3, 4, 1], &[4, 1, 2]]);
        assert_eq!(c.plan(10), vec![]);
    }

    #[test]
    fn offline_member_is_replaced_in_a_free_zone() {
        let mut c = Cluster::new(
            &[(1, "a"), (2, "b"), (3, "c"), (4, "c"), (5, "a")],
            &[&[1, 2, 3], &[2, 3, 5]],
        );
        c.online.remove(&3);
        let ops = c.plan(10);
        // Copyset 1 keeps zones a and b: only 4 (zone c) may join.
        // Copyset 2 keeps b and a: 4 again (1 is in zone a, used).
        assert_eq!(
            ops,
            vec![
                Operation::ChangePeers {
                    copyset: 1,
                    add: 4,
                    remove: 3
                },
                Operation::ChangePeers {
                    copyset: 2,
                    add: 4,
                    remove: 3
                },
            ]
        );
        // Rate limit, and busy copysets are left alone.
        assert_eq!(c.plan(1).len(), 1);
        c.busy.insert(1);
        assert_eq!(c.plan(10).len(), 1);
    }

    #[test]
    fn no_replacement_without_a_free_zone_or_a_leader() {
        let mut c = Cluster::new(&[(1, "a"), (2, "b"), (3, "c"), (4, "a")], &[&[1, 2, 3]]);
        c.online.remove(&3);
        assert_eq!(c.plan(10), vec![], "zone c has no other server");
        let mut c = Cluster::new(ZONES4, &[&[1, 2, 3]]);
        c.online.remove(&1);
        assert_eq!(
            c.plan(10),
            vec![],
            "the dead member led: wait for an election"
        );
        c.leaders.insert(1, 2);
        assert_eq!(
            c.plan(10),
            vec![Operation::ChangePeers {
                copyset: 1,
                add: 4,
                remove: 1
            }]
        );
        c.online.remove(&2);
        assert_eq!(c.plan(10), vec![], "no quorum: nothing can change");
    }

    #[test]
    fn new_chunkserver_gets_replicas() {
        // Three servers hold everything; 4 just joined.
        let mut c = Cluster::new(ZONES4, &[&[1, 2, 3], &[2, 3, 1], &[3, 1, 2], &[1, 3, 2]]);
        let ops = c.plan(10);
        assert_eq!(ops.len(), 1, "one move at a time: {ops:?}");
        let Operation::ChangePeers {
            add,
            remove,
            copyset,
        } = ops[0]
        else {
            panic!("{ops:?}")
        };
        assert_eq!(add, 4);
        assert_ne!(c.leaders[&copyset], remove, "never removes the leader");
        // Nothing moves while a copyset is degraded.
        c.online.remove(&1);
        c.leaders.insert(1, 2);
        c.leaders.insert(4, 3);
        assert!(c
            .plan(10)
            .iter()
            .all(|op| matches!(op, Operation::ChangePeers { remove: 1, .. })));
    }

    #[test]
    fn leaders_are_balanced() {
        let mut c = Cluster::new(
            &[(1, "a"), (2, "b"), (3, "c")],
            &[&[1, 2, 3], &[1, 2, 3], &[1, 2, 3], &[1, 2, 3]],
        );
        // All four are led by 1.
        let ops = c.plan(10);
        assert!(
            matches!(ops[..], [Operation::TransferLeader { from: 1, .. }]),
            "{ops:?}"
        );
        c.leaders.insert(1, 2);
        c.leaders.insert(2, 3);
        assert_eq!(c.plan(10), vec![], "2/1/1 is balanced enough");
    }

    #[test]
    fn health_of_copysets() {
        let mut c = Cluster::new(&[(1, "a"), (2, "b"), (3, "c")], &[&[1, 2, 3]]);
        let health = |c: &Cluster| {
            View {
                model: &c.model,
                online: &c.online,
                leaders: &c.leaders,
                busy: &c.busy,
                physical: &c.physical,
            }
            .health(1)
        };
        assert_eq!(health(&c), Health::Healthy);
        c.online.remove(&3);
        assert_eq!(health(&c), Health::Degraded);
        c.online.remove(&2);
        assert_eq!(health(&c), Health::Unavailable);
    }
}
