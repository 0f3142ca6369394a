//! Guest RAM for `data_is_ptr` transfers: a cache of foreign mappings in 2 MiB buckets
//! (what QEMU's mapcache does), emptied by IOREQ_TYPE_INVALIDATE.

use xen::{DomId, ForeignError, ForeignMemory, Gfn, MemError, SharedMem, PAGE_SHIFT};

use crate::layout::RamLayout;

/// log2 of the bucket size (2 MiB).
pub const BUCKET_SHIFT: u32 = 21;
/// Buckets kept mapped at once (128 MiB of guest RAM).
pub const CACHE_BUCKETS: usize = 64;

/// Errors reaching guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum GuestMemError {
    /// The address is not guest RAM.
    #[error("dom{domid}: guest-physical {gpa:#x}+{len} is outside RAM ({ram:#x} bytes)")]
    OutOfRam {
        /// Domain.
        domid: DomId,
        /// Address.
        gpa: u64,
        /// Length.
        len: usize,
        /// RAM size.
        ram: u64,
    },
    /// Mapping failed.
    #[error("dom{domid}: mapping guest RAM at {gpa:#x}: {source}")]
    Map {
        /// Domain.
        domid: DomId,
        /// Address.
        gpa: u64,
        /// The error.
        #[source]
        source: ForeignError,
    },
    /// The access failed inside a mapping.
    #[error("dom{domid}: guest RAM access at {gpa:#x}: {source}")]
    Access {
        /// Domain.
        domid: DomId,
        /// Address.
        gpa: u64,
        /// The error.
        #[source]
        source: MemError,
    },
}

/// One cached mapping: `len` bytes of guest RAM from `gpa`.
struct Mapped {
    gpa: u64,
    mem: SharedMem,
}

/// Cached foreign mappings of one guest's RAM.
pub struct GuestMemory {
    foreign: Box<dyn ForeignMemory>,
    domid: DomId,
    layout: RamLayout,
    slots: Vec<Option<Mapped>>,
    /// Frame list for a bucket map, reused (no allocation per miss).
    gfns: Vec<Gfn>,
    last: usize,
    victim: usize,
    maps: u64,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("domid", &self.domid)
            .field("layout", &self.layout)
            .field("mapped", &self.slots.iter().flatten().count())
            .finish()
    }
}

impl GuestMemory {
    /// RAM of `domid`: `ram_bytes` starting at guest-physical 0.
    pub fn new(foreign: Box<dyn ForeignMemory>, domid: DomId, ram_bytes: u64) -> Self {
        Self::with_layout(foreign, domid, RamLayout::flat(ram_bytes))
    }

    /// RAM of `domid` where `layout` says it is.
    pub fn with_layout(foreign: Box<dyn ForeignMemory>, domid: DomId, layout: RamLayout) -> Self {
        GuestMemory {
            foreign,
            domid,
            layout,
            slots: (0..CACHE_BUCKETS).map(|_| None).collect(),
            gfns: Vec::with_capacity(1 << (BUCKET_SHIFT - PAGE_SHIFT)),
            last: 0,
            victim: 0,
            maps: 0,
        }
    }

    /// Guest RAM size.
    pub fn ram_bytes(&self) -> u64 {
        self.layout.total()
    }

    /// Where guest RAM is.
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// Mappings made so far (cache misses).
    pub fn maps(&self) -> u64 {
        self.maps
    }

    /// Buckets currently mapped.
    pub fn mapped(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Drops every mapping (IOREQ_TYPE_INVALIDATE).
    pub fn invalidate(&mut self) {
        for s in &mut self.slots {
            *s = None;
        }
    }

    fn out_of_ram(&self, gpa: u64, len: usize) -> GuestMemError {
        GuestMemError::OutOfRam {
            domid: self.domid,
            gpa,
            len,
            ram: self.layout.total(),
        }
    }

    fn covers(m: &Mapped, gpa: u64) -> bool {
        gpa >= m.gpa && gpa - m.gpa < m.mem.len() as u64
    }

    /// The slot of a mapping that holds `gpa`, mapping one if needed: the 2 MiB bucket
    /// around `gpa` (clipped to its RAM region), or, if some frame of the bucket cannot be
    /// mapped (a ballooned-out page, a hole), just the page of `gpa`.
    fn slot(&mut self, gpa: u64) -> Result<usize, GuestMemError> {
        if let Some(Some(m)) = self.slots.get(self.last) {
            if Self::covers(m, gpa) {
                return Ok(self.last);
            }
        }
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|m| Self::covers(m, gpa)))
        {
            self.last = i;
            return Ok(i);
        }
        let Some((rs, re)) = self.layout.region_of(gpa) else {
            return Err(self.out_of_ram(gpa, 1));
        };
        let bucket_start = (gpa >> BUCKET_SHIFT) << BUCKET_SHIFT;
        let first = bucket_start.max(rs);
        let end = bucket_start.saturating_add(1 << BUCKET_SHIFT).min(re);
        let mapped = match self.map_range(first, end) {
            Ok(m) => Mapped { gpa: first, mem: m },
            Err(_) => {
                let page = (gpa >> PAGE_SHIFT) << PAGE_SHIFT;
                let m = self
                    .map_range(page, page + (1 << PAGE_SHIFT))
                    .map_err(|source| GuestMemError::Map {
                        domid: self.domid,
                        gpa: page,
                        source,
                    })?;
                Mapped { gpa: page, mem: m }
            }
        };
        self.maps += 1;
        let i = self.victim;
        self.victim = (self.victim + 1) % CACHE_BUCKETS;
        if let Some(s) = self.slots.get_mut(i) {
            *s = Some(mapped);
        }
        self.last = i;
        Ok(i)
    }

    fn map_range(&mut self, start: u64, end: u64) -> Result<SharedMem, ForeignError> {
        self.gfns.clear();
        self.gfns.extend(
            (start >> PAGE_SHIFT)..(end.saturating_add((1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT),
        );
        self.foreign.map(self.domid, &self.gfns, true)
    }

    fn each_piece(
        &mut self,
        gpa: u64,
        len: usize,
        mut f: impl FnMut(&SharedMem, usize, usize, usize) -> Result<(), MemError>,
    ) -> Result<(), GuestMemError> {
        if !self.layout.contains(gpa, len as u64) {
            return Err(self.out_of_ram(gpa, len));
        }
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let i = self.slot(at)?;
            let Some(Some(m)) = self.slots.get(i) else {
                return Err(self.out_of_ram(at, len - done));
            };
            let off = (at - m.gpa) as usize;
            let n = (len - done).min(m.mem.len().saturating_sub(off));
            if n == 0 {
                return Err(self.out_of_ram(at, len - done));
            }
            f(&m.mem, off, done, n).map_err(|source| GuestMemError::Access {
                domid: self.domid,
                gpa: at,
                source,
            })?;
            done += n;
        }
        Ok(())
    }

    /// Reads guest RAM at `gpa`.
    pub fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let len = buf.len();
        self.each_piece(gpa, len, |m, off, done, n| {
            m.read(off, &mut buf[done..done + n])
        })
    }

    /// Writes guest RAM at `gpa`.
    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), GuestMemError> {
        self.each_piece(gpa, data.len(), |m, off, done, n| {
            m.write(off, &data[done..done + n])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xen::{Resource, PAGE_SIZE};

    /// Foreign mapping of a fake guest whose page `g` is filled with the byte `g as u8`, and
    /// whose frame `bad` cannot be mapped (ballooned out): a map naming it fails whole, as
    /// IOCTL_PRIVCMD_MMAPBATCH_V2 does.
    struct Fake {
        bad: Gfn,
    }

    impl ForeignMemory for Fake {
        fn map(&self, domid: DomId, gfns: &[Gfn], _w: bool) -> Result<SharedMem, ForeignError> {
            if gfns.contains(&self.bad) {
                return Err(ForeignError::Frame {
                    domid,
                    gfn: self.bad,
                    errno: libc::ENOENT,
                });
            }
            let m = SharedMem::anonymous(gfns.len() * PAGE_SIZE).unwrap();
            for (i, g) in gfns.iter().enumerate() {
                m.fill(i * PAGE_SIZE, PAGE_SIZE, *g as u8).unwrap();
            }
            Ok(m)
        }
        fn map_resource(
            &self,
            domid: DomId,
            _r: Resource,
            _f: u64,
            _n: u64,
        ) -> Result<SharedMem, ForeignError> {
            Err(ForeignError::Restricted {
                restricted: domid,
                requested: domid,
            })
        }
        fn restrict(&self, _d: DomId) -> Result<(), ForeignError> {
            Ok(())
        }
    }

    #[test]
    fn an_unmappable_frame_costs_only_its_own_page() {
        let mut m = GuestMemory::new(Box::new(Fake { bad: 0x23 }), 5, 16 << 20);
        let mut b = [0u8; 8];
        // Page 0x22 shares its 2 MiB bucket with the bad frame: mapped alone.
        m.read(0x22 * 4096 + 8, &mut b).unwrap();
        assert_eq!(b, [0x22; 8]);
        assert!(matches!(
            m.read(0x23 * 4096, &mut b),
            Err(GuestMemError::Map { gpa: 0x23000, .. })
        ));
        // A clean bucket is mapped whole: one map serves both reads.
        let before = m.maps();
        m.read(0x300 * 4096, &mut b).unwrap();
        m.read(0x301 * 4096, &mut b).unwrap();
        assert_eq!(b, [0x01; 8]);
        assert_eq!(m.maps(), before + 1);
        // A read spanning the last page of one mapping and the next page.
        let mut two = [0u8; 2];
        m.read(0x3ff * 4096 + 4095, &mut two).unwrap();
        assert_eq!(two, [0xff, 0x00]);
    }

    #[test]
    fn relocated_ram_is_reachable_and_the_hole_is_not() {
        let mut m =
            GuestMemory::with_layout(Box::new(Fake { bad: u64::MAX }), 5, RamLayout::hvm(5 << 30));
        let mut b = [0u8; 4];
        m.read((4 << 30) + 0x5000, &mut b).unwrap();
        assert_eq!(b, [0x05; 4]);
        assert!(matches!(
            m.read(0xF000_1000, &mut b),
            Err(GuestMemError::OutOfRam { .. })
        ));
    }
}
