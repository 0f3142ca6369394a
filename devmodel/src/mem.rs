//! Guest RAM as the devices see it: the guest's frames mapped once (foreign mapping on Xen,
//! the domain's memfd in xensim) as [`SharedMem`] regions, and a vm-memory
//! [`GuestMemoryMmap`] built over the same mappings for virtio-queue.
//!
//! The vm-memory regions are built with raw pointers into the `SharedMem` mappings; a
//! [`RamMap`] owns both, so the mappings outlive every region. IOREQ_TYPE_INVALIDATE swaps in
//! a fresh [`RamMap`] (see [`GuestRam::invalidate`]); queue threads that still hold the old one
//! keep it alive until their batch ends.

use std::sync::{Arc, Mutex};

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
pub struct ForeignRam {
    fm: Box<dyn ForeignMemory>,
    domid: DomId,
    layout: Vec<(u64, u64)>,
}

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
        ForeignRam { fm, domid, layout }
    }
}

impl RamSource for ForeignRam {
    fn map(&self) -> Result<Vec<RamRegion>, MemMapError> {
        let mut out = Vec::with_capacity(self.layout.len());
        for &(start, end) in &self.layout {
            let gfns: Vec<u64> = (start >> 12..end >> 12).collect();
            let mem =
                self.fm
                    .map(self.domid, &gfns, true)
                    .map_err(|source| MemMapError::Foreign {
                        domid: self.domid,
                        start,
                        end,
                        source,
                    })?;
            out.push(RamRegion {
                gpa: start,
                mem: Arc::new(mem),
            });
        }
        Ok(out)
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
}

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
        })
    }

    /// The current mapping.
    pub fn get(&self) -> Arc<RamMap> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Drops the current mapping and maps guest RAM again (IOREQ_TYPE_INVALIDATE: the
    /// guest's physmap changed, for example after ballooning).
    pub fn invalidate(&self) -> Result<(), MemMapError> {
        let map = RamMap::new(self.domid, self.source.map()?)?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        Ok(())
    }
}
