//! Where replicas go: three zones per copyset, even load, and wide scatter
//! (a chunkserver shares copysets with as many others as it can, so a dead
//! one's data is re-replicated from many sources at once, as in Curve).

use std::collections::{HashMap, HashSet};

/// A chunkserver that may take replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    pub zone: String,
}

pub const REPLICAS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{zones} zone(s) with chunkservers; a copyset needs {REPLICAS} different zones")]
    NotEnoughZones { zones: usize },
}

/// Places `count` new copysets over `candidates`, given how many replicas
/// each holds already (`load`). Each copyset gets [`REPLICAS`] members in
/// distinct zones; every replica goes to the least-loaded chunkserver of a
/// zone not yet used by that copyset, ties broken towards chunkservers it
/// shares fewest copysets with (scatter width), then by id.
pub fn place_copysets(
    count: usize,
    candidates: &[Candidate],
    load: &HashMap<u64, usize>,
) -> Result<Vec<Vec<u64>>, PlacementError> {
    let zones: HashSet<&str> = candidates.iter().map(|c| c.zone.as_str()).collect();
    if zones.len() < REPLICAS {
        return Err(PlacementError::NotEnoughZones { zones: zones.len() });
    }
    let mut load: HashMap<u64, usize> = candidates
        .iter()
        .map(|c| (c.id, load.get(&c.id).copied().unwrap_or(0)))
        .collect();
    let mut together: HashMap<(u64, u64), usize> = HashMap::new();
    let mut placed = Vec::with_capacity(count);
    for _ in 0..count {
        let mut members: Vec<&Candidate> = Vec::with_capacity(REPLICAS);
        for _ in 0..REPLICAS {
            let best = candidates
                .iter()
                .filter(|c| members.iter().all(|m| m.zone != c.zone))
                .min_by_key(|c| {
                    let shared: usize = members
                        .iter()
                        .map(|m| together.get(&pair(c.id, m.id)).copied().unwrap_or(0))
                        .sum();
                    (load[&c.id], shared, c.id)
                })
                .expect("three zones exist");
            members.push(best);
        }
        for (i, a) in members.iter().enumerate() {
            *load.get_mut(&a.id).expect("a candidate") += 1;
            for b in &members[i + 1..] {
                *together.entry(pair(a.id, b.id)).or_default() += 1;
            }
        }
        let mut ids: Vec<u64> = members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        placed.push(ids);
    }
    Ok(placed)
}

fn pair(a: u64, b: u64) -> (u64, u64) {
    (a.min(b), a.max(b))
}

/// A chunkserver to take a replica of a copyset whose remaining members sit
/// in `used_zones`: the least-loaded candidate outside those zones and not a
/// member already.
pub fn pick_replacement<'a>(
    candidates: &'a [Candidate],
    members: &[u64],
    used_zones: &HashSet<&str>,
    load: &HashMap<u64, usize>,
) -> Option<&'a Candidate> {
    candidates
        .iter()
        .filter(|c| !members.contains(&c.id) && !used_zones.contains(c.zone.as_str()))
        .min_by_key(|c| (load.get(&c.id).copied().unwrap_or(0), c.id))
}

/// Distinct chunkservers each one shares at least one copyset with.
pub fn scatter_width(copysets: &[Vec<u64>]) -> HashMap<u64, usize> {
    let mut peers: HashMap<u64, HashSet<u64>> = HashMap::new();
    for members in copysets {
        for a in members {
            let set = peers.entry(*a).or_default();
            set.extend(members.iter().filter(|b| *b != a));
        }
    }
    peers.into_iter().map(|(id, s)| (id, s.len())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(zones: &[(&str, u64)]) -> Vec<Candidate> {
        let mut out = Vec::new();
        let mut id = 1;
        for (zone, n) in zones {
            for _ in 0..*n {
                out.push(Candidate {
                    id,
                    zone: zone.to_string(),
                });
                id += 1;
            }
        }
        out
    }

    fn zone_of(c: &[Candidate], id: u64) -> &str {
        &c.iter().find(|c| c.id == id).unwrap().zone
    }

    #[test]
    fn refuses_fewer_than_three_zones() {
        let c = candidates(&[("a", 5), ("b", 5)]);
        assert_eq!(
            place_copysets(4, &c, &HashMap::new()),
            Err(PlacementError::NotEnoughZones { zones: 2 })
        );
    }

    #[test]
    fn three_zones_even_load_wide_scatter() {
        let c = candidates(&[("a", 3), ("b", 3), ("c", 3)]);
        let placed = place_copysets(90, &c, &HashMap::new()).unwrap();
        let mut load: HashMap<u64, usize> = HashMap::new();
        for members in &placed {
            let zones: HashSet<&str> = members.iter().map(|m| zone_of(&c, *m)).collect();
            assert_eq!(zones.len(), 3, "{members:?} spans three zones");
            for m in members {
                *load.entry(*m).or_default() += 1;
            }
        }
        // 270 replicas over 9 servers: 30 each.
        assert!(load.values().all(|n| *n == 30), "{load:?}");
        // Each server can share copysets with the 6 of other zones: it does.
        let width = scatter_width(&placed);
        assert!(width.values().all(|w| *w == 6), "{width:?}");
    }

    #[test]
    fn uneven_zones_still_spread() {
        let c = candidates(&[("a", 1), ("b", 2), ("c", 4), ("d", 1)]);
        let placed = place_copysets(40, &c, &HashMap::new()).unwrap();
        let mut load: HashMap<u64, usize> = HashMap::new();
        for members in &placed {
            let zones: HashSet<&str> = members.iter().map(|m| zone_of(&c, *m)).collect();
            assert_eq!(zones.len(), 3);
            for m in members {
                *load.entry(*m).or_default() += 1;
            }
        }
        // A copyset uses three of the four zones, so a zone takes at most
        // 40 of the 120 replicas: the best split gives the lone servers of
        // zones a and d and both of b 20 each, and c's four 10 each.
        assert!(load.values().all(|n| *n <= 21), "{load:?}");
        let c_loads: Vec<usize> = (4..=7).map(|id| load[&id]).collect();
        assert!(
            c_loads.iter().max().unwrap() - c_loads.iter().min().unwrap() <= 1,
            "{load:?}"
        );
    }

    #[test]
    fn new_copysets_go_to_the_least_loaded() {
        let c = candidates(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        let load = HashMap::from([(1, 10), (2, 10), (3, 10), (4, 0)]);
        let placed = place_copysets(5, &c, &load).unwrap();
        assert!(placed.iter().all(|m| m.contains(&4)), "{placed:?}");
    }

    #[test]
    fn replacement_avoids_used_zones_and_members() {
        let c = candidates(&[("a", 2), ("b", 1), ("c", 1)]);
        // Members 1 (a) and 3 (b) remain; 4 (c) died: only zone c is free,
        // but its only server is the dead member itself.
        let used = HashSet::from(["a", "b"]);
        assert_eq!(
            pick_replacement(&c, &[1, 3, 4], &used, &HashMap::new()),
            None
        );
        let used = HashSet::from(["b", "c"]);
        let load = HashMap::from([(1, 5), (2, 1)]);
        assert_eq!(pick_replacement(&c, &[3, 4], &used, &load).unwrap().id, 2);
    }
}
