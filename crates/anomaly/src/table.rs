//! A bounded map from (workload, how it was observed) to detector state, evicting the
//! least recently seen entry when full: a slab of entries threaded on an intrusive
//! recency list, so lookup, touch and eviction are O(1) and nothing grows past `cap`.

use std::collections::HashMap;

use crate::signal::Observed;

const NIL: usize = usize::MAX;

struct Entry<S> {
    key: Box<str>,
    observed: Observed,
    prev: usize,
    next: usize,
    state: S,
}

pub(crate) struct Lru<S> {
    /// Peers and the sidecar's own workload are keyed apart: one id may be both.
    peer: HashMap<Box<str>, usize>,
    own: HashMap<Box<str>, usize>,
    entries: Vec<Entry<S>>,
    /// Most recently seen.
    head: usize,
    /// Least recently seen: the next to go.
    tail: usize,
    cap: usize,
}

/// What [`Lru::get_or_insert`] did besides returning the state.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Found,
    Inserted,
    /// Inserted in place of the least recently seen entry.
    Evicted,
}

impl<S> Lru<S> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            peer: HashMap::new(),
            own: HashMap::new(),
            entries: Vec::new(),
            head: NIL,
            tail: NIL,
            cap,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The state for `key`, marked most recently seen; a new entry gets `fresh()`.
    /// `None` only when the table's capacity is zero.
    pub(crate) fn get_or_insert(
        &mut self,
        observed: Observed,
        key: &str,
        fresh: impl FnOnce() -> S,
    ) -> Option<(&mut S, Outcome)> {
        let map = match observed {
            Observed::Peer => &self.peer,
            Observed::Own => &self.own,
        };
        if let Some(&i) = map.get(key) {
            self.touch(i);
            return Some((&mut self.entries[i].state, Outcome::Found));
        }
        if self.cap == 0 {
            return None;
        }
        let (i, outcome) = if self.entries.len() < self.cap {
            self.entries.push(Entry {
                key: key.into(),
                observed,
                prev: NIL,
                next: NIL,
                state: fresh(),
            });
            let i = self.entries.len() - 1;
            self.push_front(i);
            (i, Outcome::Inserted)
        } else {
            let i = self.tail;
            let old = &mut self.entries[i];
            match old.observed {
                Observed::Peer => self.peer.remove(&old.key),
                Observed::Own => self.own.remove(&old.key),
            };
            old.key = key.into();
            old.observed = observed;
            old.state = fresh();
            self.touch(i);
            (i, Outcome::Evicted)
        };
        let map = match observed {
            Observed::Peer => &mut self.peer,
            Observed::Own => &mut self.own,
        };
        map.insert(key.into(), i);
        Some((&mut self.entries[i].state, outcome))
    }

    /// Visits every entry (recency unchanged).
    pub(crate) fn for_each(&mut self, mut f: impl FnMut(&str, Observed, &mut S)) {
        for e in &mut self.entries {
            f(&e.key, e.observed, &mut e.state);
        }
    }

    fn touch(&mut self, i: usize) {
        if self.head == i {
            return;
        }
        self.unlink(i);
        self.push_front(i);
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.entries[i].prev, self.entries[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.entries[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.entries[next].prev = prev;
        }
    }

    fn push_front(&mut self, i: usize) {
        self.entries[i].prev = NIL;
        self.entries[i].next = self.head;
        if self.head != NIL {
            self.entries[self.head].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_seen() {
        let mut t: Lru<u32> = Lru::new(3);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            let (_, o) = t.get_or_insert(Observed::Peer, k, || i as u32).unwrap();
            assert_eq!(o, Outcome::Inserted);
        }
        // `a` seen again: `b` is now the oldest.
        assert_eq!(
            t.get_or_insert(Observed::Peer, "a", || 9).unwrap().1,
            Outcome::Found
        );
        let (s, o) = t.get_or_insert(Observed::Peer, "d", || 7).unwrap();
        assert_eq!((*s, o), (7, Outcome::Evicted));
        assert_eq!(
            t.get_or_insert(Observed::Peer, "a", || 9).unwrap().0,
            &mut 0
        );
        assert_eq!(
            t.get_or_insert(Observed::Peer, "c", || 9).unwrap().0,
            &mut 2
        );
        // `b` was evicted: it comes back fresh, in place of `d`.
        let (s, o) = t.get_or_insert(Observed::Peer, "b", || 5).unwrap();
        assert_eq!((*s, o), (5, Outcome::Evicted));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn peer_and_own_are_distinct_keys() {
        let mut t: Lru<u32> = Lru::new(4);
        t.get_or_insert(Observed::Peer, "x", || 1);
        let (s, o) = t.get_or_insert(Observed::Own, "x", || 2).unwrap();
        assert_eq!((*s, o), (2, Outcome::Inserted));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn zero_capacity_tracks_nothing() {
        let mut t: Lru<u32> = Lru::new(0);
        assert!(t.get_or_insert(Observed::Peer, "x", || 1).is_none());
    }
}
