//! A map with a capacity and an optional time to live, for what a process keeps in memory per
//! key, customer or project: past its capacity the entry written longest ago is dropped, and
//! an entry older than its time to live is gone (and dropped at the next write). Every cache
//! that uses it can always load a dropped entry again from the database, so eviction changes
//! how often the database is asked, never an answer.
//!
//! Writes and evictions are O(1) amortized: entries are kept in the order they were written
//! (a write of a key that is there already moves it to the back), and the oldest is at the
//! front.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Key → value, at most `capacity` of them, each for at most its time to live.
#[derive(Debug)]
pub struct BoundedMap<K, V> {
    capacity: usize,
    ttl: Option<Duration>,
    entries: HashMap<K, Slot<V>>,
    /// Keys in the order they were written, with the write's stamp; a key written again (or
    /// removed) leaves a stale pair behind, skipped when met and cleaned out in bulk.
    order: VecDeque<(K, u64)>,
    next_stamp: u64,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    stamp: u64,
    written: Instant,
}

impl<K: Eq + Hash + Clone, V> BoundedMap<K, V> {
    /// At most `capacity` entries (at least one), kept until pushed out.
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), ttl: None, entries: HashMap::new(), order: VecDeque::new(), next_stamp: 0 }
    }

    /// At most `capacity` entries, each for at most `ttl` after it was written.
    pub fn with_ttl(capacity: usize, ttl: Duration) -> Self {
        Self { ttl: Some(ttl), ..Self::new(capacity) }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many entries are held (expired ones included until they are dropped).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn live(&self, slot: &Slot<V>) -> bool {
        self.ttl.is_none_or(|ttl| slot.written.elapsed() < ttl)
    }

    /// The value of `key`, unless it expired.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).filter(|slot| self.live(slot)).map(|slot| &slot.value)
    }

    /// The value of `key` to change in place, unless it expired (its age and place in the
    /// order stay as they were).
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let ttl = self.ttl;
        self.entries
            .get_mut(key)
            .filter(|slot| ttl.is_none_or(|ttl| slot.written.elapsed() < ttl))
            .map(|slot| &mut slot.value)
    }

    /// Writes `key` (the newest entry now), then drops what expired and, past the capacity,
    /// the oldest entries.
    pub fn insert(&mut self, key: K, value: V) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.order.push_back((key.clone(), stamp));
        self.entries.insert(key, Slot { value, stamp, written: Instant::now() });
        self.evict();
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let removed = self.entries.remove(key).map(|slot| slot.value);
        self.compact_if_stale();
        removed
    }

    /// Keeps only the entries for which `keep` says so.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.entries.retain(|key, slot| keep(key, &slot.value));
        self.compact_if_stale();
    }

    /// Drops the entries that expired; returns how many are left.
    pub fn sweep(&mut self) -> usize {
        self.evict();
        self.entries.len()
    }

    /// Drops expired entries from the front, then the oldest while over capacity.
    fn evict(&mut self) {
        while let Some((key, stamp)) = self.order.front() {
            let current = self.entries.get(key).filter(|slot| slot.stamp == *stamp);
            let evicted = match current {
                // Stale: the key was written again since, or removed.
                None => {
                    self.order.pop_front();
                    continue;
                }
                Some(slot) => self.entries.len() > self.capacity || !self.live(slot),
            };
            if !evicted {
                break;
            }
            if let Some((key, _)) = self.order.pop_front() {
                self.entries.remove(&key);
            }
        }
        self.compact_if_stale();
    }

    /// Cleans the stale pairs out of the order once they outnumber the entries.
    fn compact_if_stale(&mut self) {
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|(key, stamp)| entries.get(key).is_some_and(|slot| slot.stamp == *stamp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_write_goes_first() {
        let mut map = BoundedMap::new(3);
        for i in 0..3 {
            map.insert(i, i * 10);
        }
        map.insert(0, 0); // written again: now the newest
        map.insert(3, 30);
        assert_eq!(map.len(), 3);
        assert_eq!(map.get(&1), None, "the oldest write is evicted");
        assert_eq!((map.get(&0), map.get(&2), map.get(&3)), (Some(&0), Some(&20), Some(&30)));
    }

    #[test]
    fn it_never_holds_more_than_its_capacity() {
        let mut map = BoundedMap::new(100);
        for i in 0..100_000u32 {
            map.insert(i % 1_000, i);
            assert!(map.len() <= 100);
            if i % 7 == 0 {
                map.remove(&(i % 1_000));
            }
        }
        assert!(map.order.len() <= 2 * map.len() + 64 + 1, "stale pairs are cleaned out");
    }

    #[test]
    fn expired_entries_are_gone_and_dropped() {
        let mut map = BoundedMap::with_ttl(10, Duration::from_millis(30));
        map.insert("a", 1);
        assert_eq!(map.get("a"), Some(&1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(map.get("a"), None);
        assert_eq!(map.get_mut("a"), None);
        assert_eq!(map.len(), 1, "held until the next write or sweep");
        assert_eq!(map.sweep(), 0);
        map.insert("b", 2);
        assert_eq!(map.get("b"), Some(&2));
    }

    #[test]
    fn retain_and_remove_keep_the_order_right() {
        let mut map = BoundedMap::new(2);
        map.insert(1, "one");
        map.insert(2, "two");
        map.retain(|k, _| *k != 1);
        map.insert(3, "three");
        assert_eq!(map.len(), 2);
        assert_eq!((map.get(&2), map.get(&3)), (Some(&"two"), Some(&"three")));
        assert_eq!(map.remove(&2), Some("two"));
        map.insert(4, "four");
        assert_eq!((map.get(&3), map.get(&4)), (Some(&"three"), Some(&"four")));
    }
}
