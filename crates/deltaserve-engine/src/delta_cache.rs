//! Which tenants' deltas are in memory, under a byte budget with least-recently-used eviction.
//!
//! The cache only keeps the books; the engine does the loading (off its step loop) and tells the
//! cache when a load starts ([`DeltaCache::reserve`]) and ends ([`DeltaCache::finish`]). A load
//! reserves its estimated size up front, so two loads never overcommit the budget together, and a
//! second request for a delta that is already loading finds it [`Lookup::Loading`] and waits for
//! that one load. A delta pinned by a running sequence is never evicted.
//!
//! Generic over the value so its rules are tested without a model.

use std::collections::HashMap;
use std::sync::Arc;

/// A tenant's key in the cache: unique per registration, so a tenant removed and added again
/// under the same name never meets the old weights.
pub type TenantId = u64;

/// What the cache knows about one delta.
#[derive(Debug)]
pub enum Lookup<T> {
    /// In memory.
    Ready(Arc<T>),
    /// A load is under way.
    Loading,
    /// Loading failed; the reason, for the requests that wanted it.
    Failed(String),
    /// Not in memory and not loading.
    Absent,
}

/// Why a load cannot start now.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoom {
    /// Deltas pinned by running sequences (or other loads) fill the budget; retry when some finish.
    Busy,
    /// The delta is larger than the whole budget.
    TooLarge {
        /// Its estimated size.
        bytes: usize,
        /// The budget.
        budget: usize,
    },
}

#[derive(Debug)]
enum Slot<T> {
    Loading {
        reserved: usize,
        doomed: bool,
    },
    Ready {
        value: Arc<T>,
        bytes: usize,
        pins: usize,
        last_used: u64,
        doomed: bool,
    },
    Failed(String),
}

/// Deltas in memory, keyed by [`TenantId`].
#[derive(Debug)]
pub struct DeltaCache<T> {
    budget: usize,
    /// Bytes of ready deltas plus bytes reserved by loads under way.
    used: usize,
    clock: u64,
    slots: HashMap<TenantId, Slot<T>>,
}

impl<T> DeltaCache<T> {
    /// An empty cache that holds at most `budget` bytes.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            clock: 0,
            slots: HashMap::new(),
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes held or reserved.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Number of deltas in memory.
    pub fn resident(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Ready { .. }))
            .count()
    }

    /// Whether `id` is in memory.
    pub fn is_resident(&self, id: TenantId) -> bool {
        matches!(self.slots.get(&id), Some(Slot::Ready { .. }))
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Looks `id` up without changing its recency.
    pub fn lookup(&self, id: TenantId) -> Lookup<T> {
        match self.slots.get(&id) {
            Some(Slot::Ready { value, .. }) => Lookup::Ready(value.clone()),
            Some(Slot::Loading { .. }) => Lookup::Loading,
            Some(Slot::Failed(reason)) => Lookup::Failed(reason.clone()),
            None => Lookup::Absent,
        }
    }

    /// Marks `id` in use by one more sequence and returns it; `None` unless it is in memory.
    pub fn pin(&mut self, id: TenantId) -> Option<Arc<T>> {
        let now = self.tick();
        match self.slots.get_mut(&id) {
            Some(Slot::Ready {
                value,
                pins,
                last_used,
                ..
            }) => {
                *pins += 1;
                *last_used = now;
                Some(value.clone())
            }
            _ => None,
        }
    }

    /// Marks `id` in use by one sequence less. Returns true if that dropped a removed delta.
    pub fn unpin(&mut self, id: TenantId) -> bool {
        let drop_now = match self.slots.get_mut(&id) {
            Some(Slot::Ready { pins, doomed, .. }) => {
                *pins = pins.saturating_sub(1);
                *pins == 0 && *doomed
            }
            _ => false,
        };
        if drop_now {
            self.drop_slot(id);
        }
        drop_now
    }

    fn drop_slot(&mut self, id: TenantId) {
        match self.slots.remove(&id) {
            Some(Slot::Ready { bytes, .. }) => self.used -= bytes,
            Some(Slot::Loading { reserved, .. }) => self.used -= reserved,
            _ => {}
        }
    }

    /// Unpinned deltas to evict, least recently used first, so that `need` more bytes fit; `None`
    /// if even evicting all of them would not make room.
    fn victims(&self, need: usize) -> Option<Vec<TenantId>> {
        let excess = (self.used + need).saturating_sub(self.budget);
        if excess == 0 {
            return Some(Vec::new());
        }
        let mut free: Vec<(u64, TenantId, usize)> = self
            .slots
            .iter()
            .filter_map(|(&id, s)| match s {
                Slot::Ready {
                    pins: 0,
                    last_used,
                    bytes,
                    ..
                } => Some((*last_used, id, *bytes)),
                _ => None,
            })
            .collect();
        free.sort_unstable();
        let mut freed = 0;
        let mut out = Vec::new();
        for (_, id, bytes) in free {
            if freed >= excess {
                break;
            }
            freed += bytes;
            out.push(id);
        }
        (freed >= excess).then_some(out)
    }

    /// Starts a load of `id` estimated at `bytes`: evicts unpinned deltas (least recently used
    /// first) until it fits and reserves the room. Returns the evicted ids; evicts nothing when
    /// it cannot make room.
    pub fn reserve(&mut self, id: TenantId, bytes: usize) -> Result<Vec<TenantId>, NoRoom> {
        if bytes > self.budget {
            return Err(NoRoom::TooLarge {
                bytes,
                budget: self.budget,
            });
        }
        let victims = self.victims(bytes).ok_or(NoRoom::Busy)?;
        for &v in &victims {
            self.drop_slot(v);
        }
        self.used += bytes;
        self.slots.insert(
            id,
            Slot::Loading {
                reserved: bytes,
                doomed: false,
            },
        );
        Ok(victims)
    }

    /// Ends the load of `id`: stores the delta with its measured size, or the failure. If the
    /// delta came out larger than estimated, evicts unpinned others to stay in budget (as far as
    /// possible). Returns the evicted ids.
    pub fn finish(&mut self, id: TenantId, result: Result<(T, usize), String>) -> Vec<TenantId> {
        let (reserved, doomed) = match self.slots.get(&id) {
            Some(Slot::Loading { reserved, doomed }) => (*reserved, *doomed),
            _ => (0, true),
        };
        self.used -= reserved;
        self.slots.remove(&id);
        match result {
            Err(reason) => {
                self.slots.insert(id, Slot::Failed(reason));
                Vec::new()
            }
            Ok((value, bytes)) => {
                let victims = self.victims(bytes).unwrap_or_else(|| {
                    // Pinned deltas fill the budget: evict what can go and run over until they finish.
                    self.slots
                        .iter()
                        .filter(|(_, s)| matches!(s, Slot::Ready { pins: 0, .. }))
                        .map(|(&id, _)| id)
                        .collect()
                });
                for &v in &victims {
                    self.drop_slot(v);
                }
                let now = self.tick();
                self.used += bytes;
                self.slots.insert(
                    id,
                    Slot::Ready {
                        value: Arc::new(value),
                        bytes,
                        pins: 0,
                        last_used: now,
                        doomed,
                    },
                );
                victims
            }
        }
    }

    /// Records that `id` cannot be loaded (without trying).
    pub fn mark_failed(&mut self, id: TenantId, reason: String) {
        self.drop_slot(id);
        self.slots.insert(id, Slot::Failed(reason));
    }

    /// Forgets `id` (its tenant was removed): at once if no sequence uses it, else when the last
    /// one finishes.
    pub fn remove(&mut self, id: TenantId) {
        match self.slots.get_mut(&id) {
            Some(Slot::Ready { pins, doomed, .. }) if *pins > 0 => *doomed = true,
            Some(Slot::Loading { doomed, .. }) => *doomed = true,
            Some(_) => self.drop_slot(id),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_request_for_a_loading_delta_waits_for_the_same_load() {
        let mut c = DeltaCache::<&str>::new(100);
        assert!(matches!(c.lookup(1), Lookup::Absent));
        assert_eq!(c.reserve(1, 40), Ok(vec![]));
        assert!(matches!(c.lookup(1), Lookup::Loading));
        assert_eq!(c.used(), 40);
        c.finish(1, Ok(("one", 30)));
        assert_eq!(c.used(), 30);
        assert!(matches!(c.lookup(1), Lookup::Ready(v) if *v == "one"));
    }

    #[test]
    fn least_recently_used_unpinned_delta_is_evicted_first() {
        let mut c = DeltaCache::<u32>::new(100);
        for id in 1..=3 {
            c.reserve(id, 30).unwrap();
            c.finish(id, Ok((id as u32, 30)));
        }
        // Touch 1 so that 2 is the oldest.
        c.pin(1);
        c.unpin(1);
        assert_eq!(c.reserve(4, 30), Ok(vec![2]));
        assert!(!c.is_resident(2) && c.is_resident(1) && c.is_resident(3));
    }

    #[test]
    fn pinned_delta_is_never_evicted() {
        let mut c = DeltaCache::<u32>::new(60);
        c.reserve(1, 30).unwrap();
        c.finish(1, Ok((1, 30)));
        c.reserve(2, 30).unwrap();
        c.finish(2, Ok((2, 30)));
        c.pin(1);
        c.pin(2);
        assert_eq!(c.reserve(3, 30), Err(NoRoom::Busy));
        assert_eq!(c.used(), 60, "a refused reservation evicts nothing");
        c.unpin(2);
        assert_eq!(c.reserve(3, 30), Ok(vec![2]));
        assert!(c.is_resident(1));
    }

    #[test]
    fn too_large_and_failed_loads_are_reported() {
        let mut c = DeltaCache::<u32>::new(10);
        assert_eq!(
            c.reserve(1, 11),
            Err(NoRoom::TooLarge {
                bytes: 11,
                budget: 10
            })
        );
        c.reserve(2, 5).unwrap();
        c.finish(2, Err("corrupt".into()));
        assert!(matches!(c.lookup(2), Lookup::Failed(r) if r == "corrupt"));
        assert_eq!(c.used(), 0);
    }

    #[test]
    fn removed_delta_goes_when_its_last_user_finishes() {
        let mut c = DeltaCache::<u32>::new(100);
        c.reserve(1, 10).unwrap();
        c.finish(1, Ok((1, 10)));
        c.pin(1);
        c.remove(1);
        assert!(c.is_resident(1));
        assert!(c.unpin(1));
        assert!(!c.is_resident(1));
        assert_eq!(c.used(), 0);
    }

    #[test]
    fn larger_than_estimated_delta_evicts_others() {
        let mut c = DeltaCache::<u32>::new(100);
        c.reserve(1, 50).unwrap();
        c.finish(1, Ok((1, 50)));
        c.reserve(2, 40).unwrap();
        assert_eq!(c.finish(2, Ok((2, 60))), vec![1]);
        assert_eq!(c.used(), 60);
    }
}
