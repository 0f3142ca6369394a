//! Guest RAM for `data_is_ptr` transfers: a cache of foreign mappings in 2 MiB buckets
//! (what QEMU's mapcache does), emptied by IOREQ_TYPE_INVALIDATE.

use xen::{DomId, ForeignError, ForeignMemory, Gfn, MemError, SharedMem, PAGE_SHIFT};

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

/// Cached foreign mappings of one guest's RAM.
pub struct GuestMemory {
    foreign: Box<dyn ForeignMemory>,
    domid: DomId,
    ram_bytes: u64,
    slots: Vec<Option<(u64, SharedMem)>>,
    last: usize,
    victim: usize,
    maps: u64,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("domid", &self.domid)
            .field("ram_bytes", &self.ram_bytes)
            .field("mapped", &self.slots.iter().flatten().count())
            .finish()
    }
}

impl GuestMemory {
    /// RAM of `domid`: `ram_bytes` starting at guest-physical 0.
    pub fn new(foreign: Box<dyn ForeignMemory>, domid: DomId, ram_bytes: u64) -> Self {
        GuestMemory {
            foreign,
            domid,
            ram_bytes,
            slots: (0..CACHE_BUCKETS).map(|_| None).collect(),
            last: 0,
            victim: 0,
            maps: 0,
        }
    }

    /// Guest RAM size.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
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

    fn check(&self, gpa: u64, len: usize) -> Result<(), GuestMemError> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.ram_bytes => Ok(()),
            _ => Err(GuestMemError::OutOfRam {
                domid: self.domid,
                gpa,
                len,
                ram: self.ram_bytes,
            }),
        }
    }

    fn slot(&mut self, bucket: u64) -> Result<usize, GuestMemError> {
        if let Some(Some((b, _))) = self.slots.get(self.last) {
            if *b == bucket {
                return Ok(self.last);
            }
        }
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|(b, _)| *b == bucket))
        {
            self.last = i;
            return Ok(i);
        }
        let first: Gfn = bucket << (BUCKET_SHIFT - PAGE_SHIFT);
        let ram_pages = self.ram_bytes >> PAGE_SHIFT;
        let n = (1u64 << (BUCKET_SHIFT - PAGE_SHIFT)).min(ram_pages.saturating_sub(first));
        let gfns: Vec<Gfn> = (first..first + n).collect();
        let m = self
            .foreign
            .map(self.domid, &gfns, true)
            .map_err(|source| GuestMemError::Map {
                domid: self.domid,
                gpa: bucket << BUCKET_SHIFT,
                source,
            })?;
        self.maps += 1;
        let i = self.victim;
        self.victim = (self.victim + 1) % CACHE_BUCKETS;
        if let Some(s) = self.slots.get_mut(i) {
            *s = Some((bucket, m));
        }
        self.last = i;
        Ok(i)
    }

    fn each_piece(
        &mut self,
        gpa: u64,
        len: usize,
        mut f: impl FnMut(&SharedMem, usize, usize, usize) -> Result<(), MemError>,
    ) -> Result<(), GuestMemError> {
        self.check(gpa, len)?;
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let bucket = at >> BUCKET_SHIFT;
            let off = (at & ((1 << BUCKET_SHIFT) - 1)) as usize;
            let i = self.slot(bucket)?;
            let Some(Some((_, m))) = self.slots.get(i) else {
                break;
            };
            let n = (len - done).min(m.len().saturating_sub(off));
            if n == 0 {
                return Err(GuestMemError::OutOfRam {
                    domid: self.domid,
                    gpa: at,
                    len: len - done,
                    ram: self.ram_bytes,
                });
            }
            f(m, off, done, n).map_err(|source| GuestMemError::Access {
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
