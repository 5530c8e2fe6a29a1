//! [`Slab`]: a generational slab, the one table type behind every per-executor connection table
//! (ingest connections' ack state, subscriber connections' queues). It owns slot reuse and
//! generation keys; it does not know what the entries are.
//!
//! Invariant: a [`Key`] names at most one entry for the slab's life: removing an entry bumps its
//! slot's generation on reuse, so a key held past its entry's removal (a completion arriving for
//! a closed connection) finds nothing instead of the slot's next tenant.

/// Names one entry: slot index plus the generation the slot had when the entry was inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// Slot in the slab.
    pub slot: u32,
    /// Generation of that slot when the entry was inserted.
    pub generation: u32,
}

struct Slot<T> {
    generation: u32,
    /// The entry, or `None` while the slot is free. The value of a removed entry is kept in
    /// `spare` for reuse (its buffers), not dropped.
    value: Option<T>,
    spare: Option<T>,
}

/// A generational slab of `T` (see the module comment). Removed values are kept per slot and
/// handed back to [`Slab::insert_with`]'s `reuse`, so entries with buffers (queues) do not
/// reallocate per connection.
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// An empty slab.
    pub fn new() -> Slab<T> {
        Slab::default()
    }

    /// Inserts an entry: `fresh()` when no removed value can be reused, else `reuse(old)` resets
    /// a removed one in place. Returns its key.
    pub fn insert_with(&mut self, fresh: impl FnOnce() -> T, reuse: impl FnOnce(&mut T)) -> Key {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                    spare: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        assert!(s.value.is_none(), "slab slot {slot} is free and occupied");
        s.generation = s.generation.wrapping_add(1);
        let value = match s.spare.take() {
            Some(mut old) => {
                reuse(&mut old);
                old
            }
            None => fresh(),
        };
        s.value = Some(value);
        self.len += 1;
        Key {
            slot,
            generation: s.generation,
        }
    }

    /// The live entry `key` names.
    pub fn get(&self, key: Key) -> Option<&T> {
        let s = self.slots.get(key.slot as usize)?;
        (s.generation == key.generation)
            .then_some(s.value.as_ref())
            .flatten()
    }

    /// The live entry `key` names, mutably.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let s = self.slots.get_mut(key.slot as usize)?;
        (s.generation == key.generation)
            .then_some(s.value.as_mut())
            .flatten()
    }

    /// Removes the entry `key` names (nothing if it is gone already); its value is kept for reuse.
    /// True if an entry was removed.
    pub fn remove(&mut self, key: Key) -> bool {
        let Some(s) = self.slots.get_mut(key.slot as usize) else {
            return false;
        };
        if s.generation != key.generation || s.value.is_none() {
            return false;
        }
        s.spare = s.value.take();
        self.free.push(key.slot);
        self.len -= 1;
        debug_assert!(self.free.len() + self.len == self.slots.len());
        true
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no entry is live.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_never_finds_a_later_tenant_of_its_slot() {
        // Insert, remove, reinsert into the same slot: the old key finds nothing, the new one its
        // entry; removing twice is a no-op; the removed value is reused, not rebuilt.
        let mut s: Slab<Vec<u32>> = Slab::new();
        let a = s.insert_with(|| vec![1], |v| v.clear());
        let b = s.insert_with(|| vec![2], |v| v.clear());
        assert_eq!(s.len(), 2);
        s.get_mut(a).unwrap().push(9);
        assert!(s.remove(a));
        assert!(!s.remove(a), "second remove is a no-op");
        assert_eq!(s.len(), 1);
        let c = s.insert_with(|| vec![3], |v| v.push(7));
        assert_eq!(c.slot, a.slot, "the freed slot is reused");
        assert_ne!(c.generation, a.generation);
        assert!(s.get(a).is_none(), "a stale key finds nothing");
        assert_eq!(
            s.get(c),
            Some(&vec![1, 9, 7]),
            "the removed value was reused"
        );
        assert_eq!(s.get(b), Some(&vec![2]));
        assert!(s
            .get(Key {
                slot: 99,
                generation: 1
            })
            .is_none());
    }
}
