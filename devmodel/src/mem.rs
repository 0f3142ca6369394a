//! Guest RAM as the devices see it: the guest's frames mapped once (foreign mapping on Xen,
//! the domain's memfd in xensim) as [`SharedMem`] regions, and a vm-memory
//! [`GuestMemoryMmap`] built over the same mappings for virtio-queue.
//!
//! The vm-memory regions are built with raw pointers into the `SharedMem` mappings; a
//! [`RamMap`] owns both, so the mappings outlive every region. IOREQ_TYPE_INVALIDATE drops the
//! current [`RamMap`] at once (an empty one takes its place) and guest RAM is mapped again
//! only when a device next needs it (see [`GuestRam::invalidate`]); queue threads that still
//! hold the old one keep it alive until their batch ends. A frame that cannot be mapped (a
//! ballooned-out page) is left out of the new map, so only the accesses that touch it fail.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backends::blk::engine::IoSeg;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use xen::{DomId, ForeignMemory, SharedMem};

/// One contiguous piece of guest RAM.
#[derive(Debug, Clone)]
pub struct RamRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// The mapping.
    pub mem: Arc<SharedMem>,
}

/// Errors mapping guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemMapError {
    /// Mapping the frames failed.
    #[error("dom{domid}: mapping guest RAM {start:#x}..{end:#x}: {source}")]
    Foreign {
        /// Domain.
        domid: DomId,
        /// Region start.
        start: u64,
        /// Region end.
        end: u64,
        /// Cause.
        #[source]
        source: xen::ForeignError,
    },
    /// vm-memory refused the layout (overlap, empty region).
    #[error("dom{domid}: guest RAM layout refused: {why}")]
    Layout {
        /// Domain.
        domid: DomId,
        /// Why.
        why: String,
    },
}

/// Where guest RAM comes from.
pub trait RamSource: Send + Sync {
    /// Maps all of guest RAM.
    fn map(&self) -> Result<Vec<RamRegion>, MemMapError>;
}

/// Regions that are already mapped (xensim, tests): every remap returns them again.
#[derive(Debug, Clone)]
pub struct FixedRam(pub Vec<RamRegion>);

impl RamSource for FixedRam {
    fn map(&self) -> Result<Vec<RamRegion>, MemMapError> {
        Ok(self.0.clone())
    }
}

/// Guest RAM of an HVM domain on Xen, mapped with foreign mapping: `[0, 0xa0000)`,
/// `[1 MiB, low_end)` (the VGA hole and the ROM area are not RAM), and the part above
/// 4 GiB.
///
/// Each range is mapped with one call. If a frame of it cannot be mapped (the guest gave it
/// back with decrease_reservation), the frames before it are mapped as one region, that
/// frame is left out (a hole: accesses to it fail) and mapping goes on after it. At most
/// [`MAX_HOLES`] holes are made per remap; past that the rest of the range is left out too,
/// so the work one remap costs is bounded (at most `2 * MAX_HOLES + ranges` map calls).
pub struct ForeignRam {
    fm: Box<dyn ForeignMemory>,
    domid: DomId,
    layout: Vec<(u64, u64)>,
    log: crate::RateLog,
}

/// Most unmappable frames one remap of guest RAM steps over before giving up on the rest of
/// a range.
pub const MAX_HOLES: usize = 64;

impl std::fmt::Debug for ForeignRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignRam")
            .field("domid", &self.domid)
            .field("layout", &self.layout)
            .finish()
    }
}

/// Where the MMIO hole starts by default (libxl and hvmloader: RAM below 4 GiB ends here).
pub const LOW_RAM_END_MAX: u64 = 0xf000_0000;

impl ForeignRam {
    /// Guest RAM of `memory` bytes in the standard HVM layout.
    pub fn new(fm: Box<dyn ForeignMemory>, domid: DomId, memory: u64) -> ForeignRam {
        let mut layout = vec![(0, memory.min(0xa0000))];
        let low_end = memory.min(LOW_RAM_END_MAX);
        if low_end > 0x10_0000 {
            layout.push((0x10_0000, low_end));
        }
        if memory > LOW_RAM_END_MAX {
            layout.push((1 << 32, (1 << 32) + memory - LOW_RAM_END_MAX));
        }
        ForeignRam {
            fm,
            domid,
            layout,
            log: crate::RateLog::new(),
        }
    }

    /// Maps frames `gfns` as one region at `gfns[0] << 12`.
    fn map_run(&self, gfns: &[u64], out: &mut Vec<RamRegion>) -> Result<(), xen::ForeignError> {
        let Some(&first) = gfns.first() else {
            return Ok(());
        };
        let mem = self.fm.map(self.domid, gfns, true)?;
        out.push(RamRegion {
            gpa: first << 12,
            mem: Arc::new(mem),
        });
        Ok(())
    }
}

impl RamSource for ForeignRam {
    fn map(&self) -> Result<Vec<RamRegion>, MemMapError> {
        let mut out = Vec::with_capacity(self.layout.len());
        let mut holes = 0usize;
        let mut first_err = None;
        // One mapping holds at most this many frames (privcmd's bound on one call): a larger
        // range becomes several regions. A buffer that straddles two of them is refused like
        // one that leaves RAM; with 16 GiB runs on Linux that is only at those boundaries.
        let chunk = self.fm.max_map_frames().max(1) as u64;
        let chunks = self.layout.iter().flat_map(|&(start, end)| {
            let (first, last) = (start >> 12, end >> 12);
            (first..last)
                .step_by(usize::try_from(chunk).unwrap_or(usize::MAX))
                .map(move |f| (f << 12, (f.saturating_add(chunk)).min(last) << 12))
        });
        for (start, end) in chunks {
            let gfns: Vec<u64> = (start >> 12..end >> 12).collect();
            let mut rest = &gfns[..];
            while !rest.is_empty() {
                let e = match self.map_run(rest, &mut out) {
                    Ok(()) => break,
                    Err(e) => e,
                };
                // Where it failed: the frames before it go in as one region, the frame is
                // a hole, and mapping goes on after it.
                let at = match &e {
                    xen::ForeignError::Frame { gfn, .. } => rest.iter().position(|g| g == gfn),
                    _ => None,
                };
                let Some(at) = at.filter(|_| holes < MAX_HOLES) else {
                    self.log.warn(format_args!(
                        "dom{}: guest RAM {:#x}..{end:#x} left unmapped: {e}",
                        self.domid,
                        rest[0] << 12
                    ));
                    first_err.get_or_insert(MemMapError::Foreign {
                        domid: self.domid,
                        start,
                        end,
                        source: e,
                    });
                    break;
                };
                holes += 1;
                if let Err(e2) = self.map_run(&rest[..at], &mut out) {
                    // It changed under us: leave the prefix out as well.
                    self.log.warn(format_args!(
                        "dom{}: guest RAM {:#x}..{:#x} left unmapped: {e2}",
                        self.domid,
                        rest[0] << 12,
                        rest[at] << 12
                    ));
                }
                self.log.info(format_args!(
                    "dom{}: guest frame {:#x} cannot be mapped ({e}); accesses to it will fail",
                    self.domid, rest[at]
                ));
                rest = &rest[at + 1..];
            }
        }
        match (out.is_empty(), first_err) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        }
    }
}

/// One mapping of guest RAM: the shared regions and vm-memory's view of them.
pub struct RamMap {
    mmap: GuestMemoryMmap,
    regions: Vec<RamRegion>,
}

impl std::fmt::Debug for RamMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamMap")
            .field("regions", &self.regions)
            .finish()
    }
}

impl RamMap {
    /// A map with no guest RAM in it: every access fails.
    pub fn empty() -> RamMap {
        RamMap {
            mmap: GuestMemoryMmap::new(),
            regions: Vec::new(),
        }
    }

    /// Builds vm-memory regions over `regions`.
    pub fn new(domid: DomId, regions: Vec<RamRegion>) -> Result<RamMap, MemMapError> {
        let layout = |why: String| MemMapError::Layout { domid, why };
        let mut gr = Vec::with_capacity(regions.len());
        for r in &regions {
            if r.mem.is_empty() || !r.mem.is_writable() {
                return Err(layout(format!(
                    "region at {:#x} is empty or read-only",
                    r.gpa
                )));
            }
            // SAFETY: `r.mem` maps `len()` readable and writable bytes at `as_ptr()` for as
            // long as the SharedMem lives; this RamMap holds an Arc of it in `regions`, and
            // the vm-memory region is built without ownership, so it never unmaps it.
            let region = unsafe {
                MmapRegion::<()>::build_raw(
                    r.mem.as_ptr(),
                    r.mem.len(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                )
            }
            .map_err(|e| layout(e.to_string()))?;
            gr.push(
                GuestRegionMmap::new(region, GuestAddress(r.gpa))
                    .map_err(|e| layout(e.to_string()))?,
            );
        }
        let mmap = GuestMemoryMmap::from_regions(gr).map_err(|e| layout(e.to_string()))?;
        Ok(RamMap { mmap, regions })
    }

    /// vm-memory's view.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mmap
    }

    /// An engine segment for `len` bytes at `gpa`, if that lies inside one region.
    pub fn seg(&self, gpa: u64, len: usize, device_writes: bool) -> Option<IoSeg> {
        let r = self.find(gpa, len)?;
        let off = usize::try_from(gpa - r.gpa).ok()?;
        IoSeg::new(r.mem.clone(), off, len, device_writes).ok()
    }

    fn find(&self, gpa: u64, len: usize) -> Option<&RamRegion> {
        let end = gpa.checked_add(len as u64)?;
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.mem.len() as u64)
    }

    /// Copies guest RAM out.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.find(gpa, buf.len()) {
            Some(r) => r.mem.read((gpa - r.gpa) as usize, buf).is_ok(),
            None => false,
        }
    }

    /// Copies into guest RAM.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.find(gpa, data.len()) {
            Some(r) => r.mem.write((gpa - r.gpa) as usize, data).is_ok(),
            None => false,
        }
    }
}

/// The current mapping of guest RAM, replaced on invalidation.
pub struct GuestRam {
    domid: DomId,
    source: Box<dyn RamSource>,
    current: Mutex<Arc<RamMap>>,
    /// INVALIDATE dropped the map; the next [`GuestRam::get`] maps guest RAM again.
    stale: AtomicBool,
    remaps: AtomicU64,
    /// When the last remap ended and how long it took: the next one waits at least as long
    /// (and [`MIN_REMAP_INTERVAL`]), so a guest that invalidates in a loop gets its RAM mapped
    /// again at most half the time, however large it is.
    last_remap: Mutex<Option<(Instant, Duration)>>,
    min_interval: Duration,
    log: crate::RateLog,
}

/// The shortest time between two remaps of guest RAM after INVALIDATE.
pub const MIN_REMAP_INTERVAL: Duration = Duration::from_millis(10);

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("domid", &self.domid)
            .finish()
    }
}

impl GuestRam {
    /// Maps guest RAM from `source`.
    pub fn new(domid: DomId, source: Box<dyn RamSource>) -> Result<GuestRam, MemMapError> {
        let map = RamMap::new(domid, source.map()?)?;
        Ok(GuestRam {
            domid,
            source,
            current: Mutex::new(Arc::new(map)),
            stale: AtomicBool::new(false),
            remaps: AtomicU64::new(0),
            last_remap: Mutex::new(None),
            min_interval: MIN_REMAP_INTERVAL,
            log: crate::RateLog::new(),
        })
    }

    /// The same with another shortest interval between remaps (tests).
    pub fn with_min_remap_interval(mut self, d: Duration) -> GuestRam {
        self.min_interval = d;
        self
    }

    /// The current mapping; after an invalidation, guest RAM is mapped again first (once,
    /// whoever asks first). If that fails the map is empty, so accesses fail rather than
    /// reach frames the guest no longer owns.
    pub fn get(&self) -> Arc<RamMap> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if self.stale.swap(false, Ordering::AcqRel) {
            self.remaps.fetch_add(1, Ordering::Relaxed);
            // Whoever needs guest RAM waits here (only this guest's devices and vCPUs): a
            // guest ballooning in a loop slows itself, not dom0.
            let mut last = self.last_remap.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((ended, took)) = *last {
                let wait = took.max(self.min_interval);
                let since = ended.elapsed();
                if since < wait {
                    std::thread::sleep(wait - since);
                }
            }
            let start = Instant::now();
            let map = self
                .source
                .map()
                .and_then(|regions| RamMap::new(self.domid, regions));
            *last = Some((Instant::now(), start.elapsed()));
            *cur = Arc::new(match map {
                Ok(m) => m,
                Err(e) => {
                    self.log.warn(format_args!(
                        "dom{}: mapping guest RAM again after invalidate: {e}; devices see no RAM until the next invalidate",
                        self.domid
                    ));
                    RamMap::empty()
                }
            });
        }
        cur.clone()
    }

    /// IOREQ_TYPE_INVALIDATE (the guest's physmap changed, for example after ballooning):
    /// drops the current mapping at once, without mapping anything (so a guest that loops on
    /// decrease_reservation costs an atomic store per hypercall); the next [`GuestRam::get`]
    /// maps guest RAM again. A queue thread that holds the old map keeps it to the end of its
    /// batch.
    pub fn invalidate(&self) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if !self.stale.swap(true, Ordering::AcqRel) {
            *cur = Arc::new(RamMap::empty());
        }
    }

    /// How many times guest RAM was mapped again after an invalidation.
    pub fn remaps(&self) -> u64 {
        self.remaps.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use vm_memory::GuestMemory;
    use xen::{ForeignError, Gfn};

    const PAGE: usize = 4096;
    const MEM: u64 = 4 << 20;

    /// Xen's foreign mapping over one anonymous "physical memory": a run of frames maps to
    /// the same bytes every time (as privcmd maps the same pages), and frames in `bad` fail
    /// the whole call, naming the first (IOCTL_PRIVCMD_MMAPBATCH_V2's per-frame error).
    struct Fake {
        phys: Arc<SharedMem>,
        bad: Arc<Mutex<BTreeSet<Gfn>>>,
        calls: Arc<AtomicU64>,
        /// Frames one call takes at most (privcmd refuses more, as `LinuxForeign` does).
        max: usize,
    }

    impl ForeignMemory for Fake {
        fn map(&self, domid: DomId, gfns: &[Gfn], _w: bool) -> Result<SharedMem, ForeignError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if gfns.len() > self.max {
                return Err(ForeignError::Os {
                    op: "mmapbatch",
                    domid,
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many"),
                });
            }
            let bad = self.bad.lock().unwrap();
            if let Some(&gfn) = gfns.iter().find(|g| bad.contains(g)) {
                return Err(ForeignError::Frame {
                    domid,
                    gfn,
                    errno: libc::EFAULT,
                });
            }
            let first = gfns[0];
            assert!(gfns.windows(2).all(|w| w[1] == w[0] + 1));
            let off = first as usize * PAGE;
            let len = gfns.len() * PAGE;
            assert!(off + len <= self.phys.len());
            let ptr = self.phys.as_ptr().wrapping_add(off);
            // SAFETY: `ptr..ptr+len` lies inside `phys`, which is mapped read/write for as
            // long as the owner (a clone of its Arc) lives, and is never unmapped before.
            Ok(unsafe { SharedMem::from_raw(ptr, len, true, Box::new(self.phys.clone())) })
        }
        fn map_resource(
            &self,
            domid: DomId,
            _r: xen::Resource,
            _f: u64,
            _n: u64,
        ) -> Result<SharedMem, ForeignError> {
            Err(ForeignError::Os {
                op: "map_resource",
                domid,
                source: std::io::Error::from_raw_os_error(libc::ENOSYS),
            })
        }
        fn restrict(&self, _d: DomId) -> Result<(), ForeignError> {
            Ok(())
        }
        fn max_map_frames(&self) -> usize {
            self.max
        }
    }

    /// A guest that invalidates in a loop (ballooning) gets its RAM mapped again no more often
    /// than the interval allows: 20 invalidate-and-access rounds take at least 19 intervals,
    /// each access still sees RAM, and each round is one remap.
    #[test]
    fn remaps_after_invalidate_are_spaced_out() {
        let phys = Arc::new(SharedMem::anonymous(MEM as usize).unwrap());
        let fm = Fake {
            phys,
            bad: Arc::new(Mutex::new(BTreeSet::new())),
            calls: Arc::new(AtomicU64::new(0)),
            max: usize::MAX,
        };
        let gap = Duration::from_millis(5);
        let ram = GuestRam::new(9, Box::new(ForeignRam::new(Box::new(fm), 9, MEM)))
            .unwrap()
            .with_min_remap_interval(gap);
        let t = Instant::now();
        for i in 0..20u64 {
            ram.invalidate();
            assert!(ram.get().write(0x10_0000, &i.to_le_bytes()), "round {i}");
        }
        assert_eq!(ram.remaps(), 20);
        assert!(t.elapsed() >= gap * 19, "{:?}", t.elapsed());
    }

    /// A RAM range larger than one foreign-mapping call takes (privcmd's bound: a guest of more
    /// than 16 GiB on Linux, scaled down here) is mapped in several calls, all of it usable,
    /// instead of being left out whole.
    #[test]
    fn ram_larger_than_one_mapping_call_is_mapped_in_runs() {
        let phys = Arc::new(SharedMem::anonymous(MEM as usize).unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let fm = Fake {
            phys: phys.clone(),
            bad: Arc::new(Mutex::new(BTreeSet::new())),
            calls: calls.clone(),
            max: 256,
        };
        let ram = GuestRam::new(9, Box::new(ForeignRam::new(Box::new(fm), 9, MEM))).unwrap();
        let map = ram.get();
        // [0, 0xa0000): 160 frames, one call; [1 MiB, 4 MiB): 768 frames, three.
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        for gpa in [0x1000u64, 0x10_0000, 0x20_0000 - 8, 0x20_0000, MEM - 8] {
            assert!(map.write(gpa, &gpa.to_le_bytes()), "{gpa:#x}");
            let mut b = [0u8; 8];
            assert!(phys.read(gpa as usize, &mut b).is_ok());
            assert_eq!(u64::from_le_bytes(b), gpa);
        }
        assert!(map.seg(MEM - PAGE as u64, PAGE, true).is_some());
    }

    /// IOREQ_TYPE_INVALIDATE with a frame the guest gave back: the invalidate itself maps
    /// nothing; the next access maps again, leaving only that frame out, so I/O to other
    /// pages (on both sides of it, and in the other RAM range) goes on and I/O to that page
    /// fails, never through the old mapping.
    #[test]
    fn invalidate_drops_the_map_and_an_unmappable_frame_fails_only_its_own_accesses() {
        let phys = Arc::new(SharedMem::anonymous(MEM as usize).unwrap());
        let bad = Arc::new(Mutex::new(BTreeSet::new()));
        let calls = Arc::new(AtomicU64::new(0));
        let fm = Fake {
            phys: phys.clone(),
            bad: bad.clone(),
            calls: calls.clone(),
            max: usize::MAX,
        };
        let ram = GuestRam::new(9, Box::new(ForeignRam::new(Box::new(fm), 9, MEM))).unwrap();
        let gone: u64 = 0x180; // a frame in [1 MiB, 4 MiB)
        let old = ram.get();
        assert!(old.write(gone << 12, b"before"));
        assert!(old.seg(gone << 12, PAGE, true).is_some());
        let mapped = calls.load(Ordering::SeqCst);

        bad.lock().unwrap().insert(gone);
        for _ in 0..1000 {
            ram.invalidate();
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            mapped,
            "invalidate maps nothing"
        );
        let new = ram.get();
        assert_eq!(ram.remaps(), 1, "one remap for a run of invalidates");
        // [0, 0xa0000) in one call; [1 MiB, 4 MiB): the failed call, the prefix, the rest.
        assert_eq!(calls.load(Ordering::SeqCst), mapped + 4);
        let g = gone << 12;
        let mut b = [0u8; 6];
        assert!(!new.read(g, &mut b), "the page that is gone reads nothing");
        assert!(!new.write(g, b"after!"), "nor is it written");
        assert!(
            new.seg(g, PAGE, true).is_none(),
            "nor is it given to the engine"
        );
        assert!(new.seg(g - PAGE as u64, 2 * PAGE, true).is_none());
        assert!(!new.memory().address_in_range(vm_memory::GuestAddress(g)));
        assert!(phys.read(g as usize, &mut b).is_ok() && &b == b"before");
        for gpa in [
            0x1000u64,
            g - PAGE as u64,
            g + PAGE as u64,
            MEM - PAGE as u64,
        ] {
            assert!(new.write(gpa, b"works!"), "{gpa:#x}");
            let mut r = [0u8; 6];
            assert!(phys.read(gpa as usize, &mut r).is_ok());
            assert_eq!(&r, b"works!", "{gpa:#x} reaches the guest's frame");
            assert!(new.seg(gpa, PAGE, true).is_some(), "{gpa:#x}");
        }
        assert!(new.seg(g + PAGE as u64, 64 * PAGE, false).is_some());

        // The frame comes back (populate_physmap, then INVALIDATE): mapped again.
        bad.lock().unwrap().clear();
        ram.invalidate();
        assert!(ram.get().write(g, b"again!"));
        assert!(phys.read(g as usize, &mut b).is_ok() && &b == b"again!");
    }

    /// Everything unmappable: the map after INVALIDATE is empty, never the old one.
    #[test]
    fn a_failed_remap_leaves_an_empty_map_not_the_stale_one() {
        let phys = Arc::new(SharedMem::anonymous(MEM as usize).unwrap());
        let bad = Arc::new(Mutex::new(BTreeSet::new()));
        let fm = Fake {
            phys,
            bad: bad.clone(),
            calls: Arc::new(AtomicU64::new(0)),
            max: usize::MAX,
        };
        let ram = GuestRam::new(9, Box::new(ForeignRam::new(Box::new(fm), 9, MEM))).unwrap();
        assert!(ram.get().write(0x2000, b"x"));
        // Every frame gone: far more holes than MAX_HOLES, so the ranges are given up.
        bad.lock().unwrap().extend(0..(MEM >> 12));
        ram.invalidate();
        let m = ram.get();
        assert!(!m.write(0x2000, b"x"));
        assert!(!m.write(0x20_0000, b"x"));
        assert!(m.seg(0x20_0000, 512, true).is_none());
    }
}
