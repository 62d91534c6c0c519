//! A slab with generation-tagged keys, so a stale key (a late response, a
//! rendezvous id from a confused peer) never reaches a reused slot.

/// Keys are `generation << 32 | index`; generation starts at 1, so 0 is never a key.
pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Slab<T> {
    pub(crate) fn with_capacity(capacity: usize) -> Slab<T> {
        Slab {
            entries: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn insert(&mut self, value: T) -> u64 {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let entry = &mut self.entries[index as usize];
            entry.generation = entry.generation.wrapping_add(1).max(1);
            entry.value = Some(value);
            return key(entry.generation, index);
        }
        let index = self.entries.len() as u32;
        self.entries.push(Entry {
            generation: 1,
            value: Some(value),
        });
        key(1, index)
    }

    pub(crate) fn get(&self, key: u64) -> Option<&T> {
        let (generation, index) = split(key);
        match self.entries.get(index as usize) {
            Some(e) if e.generation == generation => e.value.as_ref(),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        let (generation, index) = split(key);
        match self.entries.get_mut(index as usize) {
            Some(e) if e.generation == generation => e.value.as_mut(),
            _ => None,
        }
    }

    pub(crate) fn remove(&mut self, key: u64) -> Option<T> {
        let (generation, index) = split(key);
        let entry = self.entries.get_mut(index as usize)?;
        if entry.generation != generation {
            return None;
        }
        let value = entry.value.take()?;
        self.free.push(index);
        self.len -= 1;
        Some(value)
    }

    /// Removes every value, in index order.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (u64, T)> + '_ {
        self.len = 0;
        let free = &mut self.free;
        self.entries
            .iter_mut()
            .enumerate()
            .filter_map(move |(index, e)| {
                let value = e.value.take()?;
                free.push(index as u32);
                Some((key(e.generation, index as u32), value))
            })
    }
}

fn key(generation: u32, index: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

fn split(key: u64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_miss() {
        let mut slab = Slab::with_capacity(2);
        let a = slab.insert("a");
        assert_ne!(a, 0);
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b");
        assert_ne!(a, b);
        assert_eq!(slab.get_mut(a), None);
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.len(), 1);
        assert_eq!(slab.drain().map(|(_, v)| v).collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(slab.len(), 0);
        assert_eq!(slab.get_mut(b), None);
    }
}
