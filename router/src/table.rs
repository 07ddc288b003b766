//! The index's hash table: open addressing with linear probing over 16-byte
//! (key, value) slots.
//!
//! A routing decision looks up every block of a prompt in a table far larger than
//! the CPU's caches, so what matters is cache misses per lookup: here the key and
//! its value share a slot, and a lookup usually touches one cache line (a SwissTable
//! touches two: the control bytes and the slot). Keys are block hashes, already
//! uniform, so the slot comes from one multiply (Fibonacci hashing). Deletion
//! shifts later entries back, so there are no tombstones.

/// Largest fraction of slots in use before the table doubles: 3/4.
const MAX_LOAD_NUM: usize = 3;
const MAX_LOAD_DEN: usize = 4;

/// A map from `u64` keys to small `Copy` values.
#[derive(Debug, Clone)]
pub(crate) struct BlockTable<V: Copy> {
    /// Key 0 marks an empty slot; the real key 0 lives in `zero`.
    slots: Vec<(u64, V)>,
    zero: Option<V>,
    shift: u32,
    len: usize,
}

impl<V: Copy + Default> Default for BlockTable<V> {
    fn default() -> Self {
        Self::with_capacity_pow2(4)
    }
}

impl<V: Copy + Default> BlockTable<V> {
    fn with_capacity_pow2(bits: u32) -> Self {
        Self {
            slots: vec![(0, V::default()); 1 << bits],
            zero: None,
            shift: 64 - bits,
            len: 0,
        }
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes of the slot array.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<(u64, V)>()
    }

    #[inline]
    fn find(&self, key: u64) -> Option<usize> {
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].0;
            if k == key {
                return Some(i);
            }
            if k == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Starts loading `key`'s home slot into the cache, so a lookup soon after
    /// does not wait on memory.
    #[inline]
    pub(crate) fn prefetch(&self, key: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            let slot = self.slots[self.home(key)..].as_ptr();
            // A prefetch is only a hint: it never faults and changes no state.
            unsafe {
                std::arch::x86_64::_mm_prefetch(slot.cast::<i8>(), std::arch::x86_64::_MM_HINT_T0);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = key;
    }

    /// The value under `key`.
    #[inline]
    pub(crate) fn get(&self, key: u64) -> Option<&V> {
        if key == 0 {
            return self.zero.as_ref();
        }
        self.find(key).map(|i| &self.slots[i].1)
    }

    /// The value under `key`, mutably.
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        if key == 0 {
            return self.zero.as_mut();
        }
        self.find(key).map(|i| &mut self.slots[i].1)
    }

    /// The value under `key`, inserting `V::default()` first if it is absent.
    pub(crate) fn entry(&mut self, key: u64) -> &mut V {
        if key == 0 {
            if self.zero.is_none() {
                self.len += 1;
            }
            return self.zero.get_or_insert_with(V::default);
        }
        if (self.len + 1) * MAX_LOAD_DEN > self.slots.len() * MAX_LOAD_NUM {
            self.grow();
        }
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].0;
            if k == key {
                return &mut self.slots[i].1;
            }
            if k == 0 {
                self.slots[i] = (key, V::default());
                self.len += 1;
                return &mut self.slots[i].1;
            }
            i = (i + 1) & mask;
        }
    }

    /// Removes `key`, shifting back the entries that probed past it.
    pub(crate) fn remove(&mut self, key: u64) -> Option<V> {
        if key == 0 {
            let v = self.zero.take();
            if v.is_some() {
                self.len -= 1;
            }
            return v;
        }
        let mut hole = self.find(key)?;
        let value = self.slots[hole].1;
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let k = self.slots[j].0;
            if k == 0 {
                break;
            }
            // Move the entry at j into the hole unless its home lies cyclically in (hole, j].
            let home = self.home(k);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = (0, V::default());
        self.len -= 1;
        Some(value)
    }

    /// Every (key, value), in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> + '_ {
        self.zero.iter().map(|v| (0, v)).chain(
            self.slots
                .iter()
                .filter(|(k, _)| *k != 0)
                .map(|(k, v)| (*k, v)),
        )
    }

    /// Makes room for `additional` more entries without growing again.
    pub(crate) fn reserve(&mut self, additional: usize) {
        while (self.len + additional) * MAX_LOAD_DEN > self.slots.len() * MAX_LOAD_NUM {
            self.grow();
        }
    }

    fn grow(&mut self) {
        let bits = 64 - self.shift + 1;
        let old = std::mem::replace(&mut self.slots, vec![(0, V::default()); 1 << bits]);
        self.shift = 64 - bits;
        let mask = self.mask();
        for (k, v) in old {
            if k == 0 {
                continue;
            }
            let mut i = self.home(k);
            while self.slots[i].0 != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = (k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Agrees with a std HashMap under random inserts and removes, with keys
        /// drawn from a small range (so probe chains collide) and including 0.
        #[test]
        fn agrees_with_hashmap(ops in proptest::collection::vec((any::<bool>(), 0u64..200, any::<u32>()), 1..400)) {
            let mut t: BlockTable<u32> = BlockTable::default();
            let mut m: HashMap<u64, u32> = HashMap::new();
            for (insert, k, v) in ops {
                // Spread some keys to the top bits as real hashes are.
                let k = if k % 2 == 0 { k } else { k.wrapping_mul(0x9E37_79B9_7F4A_7C15) };
                if insert {
                    *t.entry(k) = v;
                    m.insert(k, v);
                } else {
                    prop_assert_eq!(t.remove(k), m.remove(&k));
                }
                prop_assert_eq!(t.len(), m.len());
            }
            for (k, v) in &m {
                prop_assert_eq!(t.get(*k), Some(v));
            }
            prop_assert_eq!(t.iter().count(), m.len());
        }
    }
}
