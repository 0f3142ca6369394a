//! The persistent-grant cache (feature-persistent): pages a frontend keeps granted stay mapped
//! between requests, keyed by grant reference, bounded, evicted least-recently-used among the
//! pages no request is using.
//!
//! Each page is its own [`GrantMapping`] so it can be unmapped alone; the cache hands out
//! `Arc`s so that an I/O segment keeps its page mapped while the engine uses it. As in Linux
//! blkback, persistent pages are mapped writable (a frontend that negotiated persistent grants
//! grants every page read-write) and one grant is never mapped twice (XSA-218 class).

use std::collections::HashMap;
use std::sync::Arc;

use xen::{DomId, GrantError, GrantMapping, GrantRef, GrantTables};

/// Linux blkback's default bound (`xen_blkif_max_pgrants`: a 32-slot ring of 33-page
/// requests). domio keeps at least this many per queue.
pub const DEFAULT_MAX_PERSISTENT_GRANTS: usize = 1056;

/// The most pages domio keeps persistently mapped for one queue (64 MiB): the cap of
/// [`persistent_grants_for_ring`] and the default of `BlkConfig::max_persistent_grants`
/// (XSA-300: mappings per frontend are bounded).
pub const MAX_PERSISTENT_GRANTS_PER_QUEUE: usize = 16384;

/// Segments one indirect page describes (4096 / sizeof(struct blkif_request_segment)).
const SEGMENTS_PER_INDIRECT_PAGE: usize = 512;

/// How many persistent grants one queue keeps: enough for every slot of its ring to carry a
/// request of the largest size advertised (`max_indirect_segments` data pages plus their
/// indirect pages), so a frontend that keeps its in-flight pages granted always hits; never
/// fewer than Linux's 1056 and never more than `cap`.
///
/// Linux sizes the cache for 32 slots × 33 pages; with 256-segment indirect requests a full
/// ring uses 32 × 257 pages and a 1056-page cache misses on almost every large request.
pub fn persistent_grants_for_ring(
    ring_slots: usize,
    max_indirect_segments: u16,
    cap: usize,
) -> usize {
    let segs = usize::from(max_indirect_segments);
    let per_request = segs + segs.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
    ring_slots
        .saturating_mul(per_request)
        .max(DEFAULT_MAX_PERSISTENT_GRANTS)
        .min(cap)
}

#[derive(Debug)]
struct Entry {
    mapping: Arc<GrantMapping>,
    last_used: u64,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// Already mapped.
    Hit(Arc<GrantMapping>),
    /// Mapped now and cached.
    Mapped(Arc<GrantMapping>),
    /// The cache is full of pages in use: the caller maps this page for this request only.
    Full,
}

/// See the module docs.
#[derive(Debug)]
pub struct PersistentGrants {
    domid: DomId,
    max: usize,
    entries: HashMap<GrantRef, Entry>,
    tick: u64,
}

impl PersistentGrants {
    /// An empty cache of at most `max` pages of domain `domid`.
    pub fn new(domid: DomId, max: usize) -> Self {
        PersistentGrants {
            domid,
            max,
            entries: HashMap::with_capacity(max.min(4096)),
            tick: 0,
        }
    }

    /// Pages cached (mapped).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `gref` is cached (no side effects).
    pub fn contains(&self, gref: GrantRef) -> bool {
        self.entries.contains_key(&gref)
    }

    /// A cached page (counts as a use for the LRU order); None if not cached.
    pub fn hit(&mut self, gref: GrantRef) -> Option<Arc<GrantMapping>> {
        self.tick += 1;
        let e = self.entries.get_mut(&gref)?;
        e.last_used = self.tick;
        Some(e.mapping.clone())
    }

    /// Pages that can still be cached without evicting.
    pub fn room(&self) -> usize {
        self.max.saturating_sub(self.entries.len())
    }

    /// Finds `gref`, or maps and caches it (evicting an unused page if full). Returns
    /// `(lookup, evicted)`.
    pub fn get(
        &mut self,
        gnttab: &dyn GrantTables,
        gref: GrantRef,
    ) -> Result<(Lookup, u64), GrantError> {
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(&gref) {
            e.last_used = self.tick;
            return Ok((Lookup::Hit(e.mapping.clone()), 0));
        }
        let mut evicted = 0;
        if self.entries.len() >= self.max {
            if !self.evict_one() {
                return Ok((Lookup::Full, 0));
            }
            evicted = 1;
        }
        let m = Arc::new(gnttab.map(self.domid, &[gref], true)?);
        self.entries.insert(
            gref,
            Entry {
                mapping: m.clone(),
                last_used: self.tick,
            },
        );
        Ok((Lookup::Mapped(m), evicted))
    }

    /// Evicts the least recently used page that no request holds; false if none.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| Arc::strong_count(&e.mapping) == 1)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(g, _)| *g);
        match victim {
            Some(g) => {
                self.entries.remove(&g);
                true
            }
            None => false,
        }
    }

    /// Unmaps every cached page (their last users drop them otherwise).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_size_follows_ring_and_segments_within_bounds() {
        let f = persistent_grants_for_ring;
        // One-page ring (32 slots) of 256-segment requests: 32 × (256 + 1 indirect page).
        assert_eq!(f(32, 256, MAX_PERSISTENT_GRANTS_PER_QUEUE), 8224);
        // Small requests: Linux's floor.
        assert_eq!(f(32, 11, MAX_PERSISTENT_GRANTS_PER_QUEUE), 1056);
        // A 16-page ring of 256-segment requests would be 131,584 pages: capped.
        assert_eq!(f(512, 256, MAX_PERSISTENT_GRANTS_PER_QUEUE), 16384);
        // A configured cap below the floor wins (tests use tiny caches).
        assert_eq!(f(32, 256, 4), 4);
    }
}
