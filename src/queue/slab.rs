//! A generational slab: stable small handles for requests, tree nodes and queriers, so a
//! stale handle (to something already removed) is detected instead of aliasing whatever
//! reused its slot.

/// A slot index plus the generation it was issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle {
    pub(crate) idx: u32,
    pub(crate) gen_: u32,
}

#[derive(Debug)]
struct Slot<T> {
    gen_: u32,
    value: Option<T>,
}

#[derive(Debug)]
pub(crate) struct Slab<T> {
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
    pub(crate) fn insert(&mut self, value: T) -> Handle {
        self.len += 1;
        if let Some(idx) = self.free.pop() {
            let slot = &mut self.slots[idx as usize];
            slot.value = Some(value);
            return Handle { idx, gen_: slot.gen_ };
        }
        let idx = u32::try_from(self.slots.len()).expect("fewer than 2^32 slab entries");
        self.slots.push(Slot {
            gen_: 0,
            value: Some(value),
        });
        Handle { idx, gen_: 0 }
    }

    pub(crate) fn get(&self, h: Handle) -> Option<&T> {
        match self.slots.get(h.idx as usize) {
            Some(slot) if slot.gen_ == h.gen_ => slot.value.as_ref(),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, h: Handle) -> Option<&mut T> {
        match self.slots.get_mut(h.idx as usize) {
            Some(slot) if slot.gen_ == h.gen_ => slot.value.as_mut(),
            _ => None,
        }
    }

    pub(crate) fn contains(&self, h: Handle) -> bool {
        self.get(h).is_some()
    }

    pub(crate) fn remove(&mut self, h: Handle) -> Option<T> {
        let slot = self.slots.get_mut(h.idx as usize)?;
        if slot.gen_ != h.gen_ || slot.value.is_none() {
            return None;
        }
        slot.gen_ = slot.gen_.wrapping_add(1);
        self.free.push(h.idx);
        self.len -= 1;
        slot.value.take()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Handle, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.value.as_ref().map(|v| {
                (
                    Handle {
                        idx: i as u32,
                        gen_: s.gen_,
                    },
                    v,
                )
            })
        })
    }

    /// Removes every value, keeping generations so that old handles stay stale.
    pub(crate) fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(v) = slot.value.take() {
                slot.gen_ = slot.gen_.wrapping_add(1);
                self.free.push(i as u32);
                out.push(v);
            }
        }
        self.len = 0;
        out
    }
}

impl<T> std::ops::Index<Handle> for Slab<T> {
    type Output = T;
    fn index(&self, h: Handle) -> &T {
        self.get(h).expect("live slab handle")
    }
}

impl<T> std::ops::IndexMut<Handle> for Slab<T> {
    fn index_mut(&mut self, h: Handle) -> &mut T {
        self.get_mut(h).expect("live slab handle")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_handle_does_not_alias_a_reused_slot() {
        let mut s = Slab::default();
        let a = s.insert("a");
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b");
        assert_eq!(a.idx, b.idx, "slot reused");
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn drain_empties_and_invalidates() {
        let mut s = Slab::default();
        let a = s.insert(1);
        s.insert(2);
        let mut all = s.drain();
        all.sort();
        assert_eq!(all, vec![1, 2]);
        assert_eq!(s.len(), 0);
        assert!(!s.contains(a));
    }
}
