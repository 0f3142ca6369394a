//! The generic shared ring of `xen/io/ring.h`, over [`SharedMem`].
//!
//! A shared ring is a 64-byte header ([`crate::abi::ring::SringHeader`]) and a power-of-two
//! array of slots, each big enough for a request or a response (the C union). The frontend
//! produces requests and consumes responses ([`FrontRing`]); the backend consumes requests and
//! produces responses ([`BackRing`]). Indices are free-running `u32`s that wrap at 2^32: every
//! comparison is a wrapping difference, exactly as in the C macros.
//!
//! The other end is untrusted. Nothing here panics on a value it writes:
//! * a request is copied out of its slot once into a private value ([`BackRing::copy_request`],
//!   XSA-155), never read in place;
//! * a producer index that claims more than a ring's worth of unanswered requests is reported
//!   as [`RingError::RequestProdOverflow`] (`RING_REQUEST_PROD_OVERFLOW`, XSA-39) and the
//!   caller should stop serving that ring;
//! * the backend never consumes a request it has no room to answer (`RING_REQUEST_CONS_OVERFLOW`).
//!
//! Ordering: the producer index is stored with `Release` after the slots are written (the
//! `xen_wmb()` of the macros) and loaded with `Acquire` before the slots are read (`xen_rmb()`);
//! where the macros use a full barrier (`xen_mb()`, between publishing an index and reading
//! the other side's event index) there is a `SeqCst` fence.

use std::marker::PhantomData;
use std::sync::atomic::{fence, Ordering};

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::abi::ring::{
    ring_entries, slot_size, RingIdx, SRING_REQ_EVENT, SRING_REQ_PROD, SRING_RING_OFFSET,
    SRING_RSP_EVENT, SRING_RSP_PROD,
};
use crate::gnttab::GrantMapping;
use crate::mem::{MemError, SharedMem};

/// Errors of ring operations. The overflow variants mean the other end broke the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The memory cannot hold a ring of these slots (or is misaligned).
    #[error("{len}-byte memory cannot hold a shared ring of {slot}-byte slots")]
    TooSmall {
        /// Length of the memory.
        len: usize,
        /// Slot size.
        slot: usize,
    },
    /// A value larger than a slot was to be written into one.
    #[error("a {size}-byte value does not fit a {slot}-byte ring slot")]
    Oversized {
        /// Size of the value.
        size: usize,
        /// Slot size.
        slot: usize,
    },
    /// An access to the shared memory failed (cannot happen for a correctly sized ring).
    #[error("shared ring memory access failed: {0}")]
    Mem(#[from] MemError),
    /// The frontend published more requests than the ring holds beyond the responses we
    /// produced (`RING_REQUEST_PROD_OVERFLOW`): a rogue or broken frontend.
    #[error("frontend request producer {req_prod} is more than {size} ahead of response producer {rsp_prod_pvt}")]
    RequestProdOverflow {
        /// The frontend's req_prod.
        req_prod: RingIdx,
        /// Our private response producer.
        rsp_prod_pvt: RingIdx,
        /// Ring size.
        size: u32,
    },
    /// The backend published responses to requests that were never sent
    /// (`RING_RESPONSE_PROD_OVERFLOW`, or beyond our request producer): a rogue backend.
    #[error("backend response producer {rsp_prod} is beyond the {outstanding} outstanding requests after {rsp_cons}")]
    ResponseProdOverflow {
        /// The backend's rsp_prod.
        rsp_prod: RingIdx,
        /// Our response consumer.
        rsp_cons: RingIdx,
        /// Requests we pushed and have not seen answered.
        outstanding: u32,
    },
    /// The frontend ring has no free slot for a request.
    #[error("shared ring is full")]
    Full,
    /// The backend tried to respond with no consumed, unanswered request.
    #[error("no consumed request awaits a response")]
    NoOutstandingRequest,
}

/// Memory a ring can live in: anything that holds a [`SharedMem`].
pub trait RingMemory {
    /// The shared memory.
    fn shared(&self) -> &SharedMem;
}

impl RingMemory for SharedMem {
    fn shared(&self) -> &SharedMem {
        self
    }
}

impl RingMemory for GrantMapping {
    fn shared(&self) -> &SharedMem {
        self.mem()
    }
}

impl<T: RingMemory + ?Sized> RingMemory for &T {
    fn shared(&self) -> &SharedMem {
        (**self).shared()
    }
}

impl<T: RingMemory + ?Sized> RingMemory for std::sync::Arc<T> {
    fn shared(&self) -> &SharedMem {
        (**self).shared()
    }
}

impl<T: RingMemory + ?Sized> RingMemory for Box<T> {
    fn shared(&self) -> &SharedMem {
        (**self).shared()
    }
}

/// Size of a slot of a ring of `Req` and `Rsp` (the C union of the two).
pub const fn slot_size_of<Req, Rsp>() -> usize {
    slot_size(
        std::mem::size_of::<Req>(),
        std::mem::align_of::<Req>(),
        std::mem::size_of::<Rsp>(),
        std::mem::align_of::<Rsp>(),
    )
}

/// Number of slots of a ring of `Req`/`Rsp` in `bytes` bytes (`__RING_SIZE`).
pub const fn ring_size_of<Req, Rsp>(bytes: usize) -> u32 {
    ring_entries(bytes, slot_size_of::<Req, Rsp>())
}

/// The geometry shared by both ends.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    nr_ents: u32,
    slot: usize,
}

impl Geometry {
    fn new(mem: &SharedMem, slot: usize) -> Result<Self, RingError> {
        let nr_ents = ring_entries(mem.len(), slot);
        // The header words are accessed atomically: the mapping must be 4-byte aligned.
        if nr_ents == 0 || (mem.as_ptr() as usize) & 3 != 0 {
            return Err(RingError::TooSmall {
                len: mem.len(),
                slot,
            });
        }
        Ok(Geometry { nr_ents, slot })
    }

    /// Byte offset of the slot of free-running index `idx`. In bounds by construction:
    /// `(idx & (nr_ents - 1)) < nr_ents` and `64 + nr_ents * slot <= len`.
    fn offset(&self, idx: RingIdx) -> usize {
        SRING_RING_OFFSET + (idx & (self.nr_ents - 1)) as usize * self.slot
    }
}

/// Initialises the shared header (`SHARED_RING_INIT`, attached at `start`): both producers at
/// `start`, both event indices at `start + 1`, the padding zeroed. The frontend does this before
/// advertising the ring.
pub fn init_shared_ring(mem: &SharedMem, start: RingIdx) -> Result<(), RingError> {
    mem.fill(0, SRING_RING_OFFSET, 0)?;
    mem.store_u32(SRING_REQ_PROD, start, Ordering::Relaxed)?;
    mem.store_u32(SRING_RSP_PROD, start, Ordering::Relaxed)?;
    mem.store_u32(SRING_REQ_EVENT, start.wrapping_add(1), Ordering::Relaxed)?;
    mem.store_u32(SRING_RSP_EVENT, start.wrapping_add(1), Ordering::Release)?;
    Ok(())
}

/// The event-index test of `RING_PUSH_*_AND_CHECK_NOTIFY`: notify iff the other side's event
/// index lies in `(old, new]`.
pub fn need_notify(old: RingIdx, new: RingIdx, event: RingIdx) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// The backend end of a shared ring: consumes requests, produces responses.
#[derive(Debug)]
pub struct BackRing<Req, Rsp, M = SharedMem> {
    mem: M,
    geo: Geometry,
    req_cons: RingIdx,
    rsp_prod_pvt: RingIdx,
    _types: PhantomData<fn(Rsp) -> Req>,
}

impl<Req, Rsp, M> BackRing<Req, Rsp, M>
where
    Req: FromBytes + IntoBytes,
    Rsp: IntoBytes + Immutable,
    M: RingMemory,
{
    /// `BACK_RING_INIT`: attach to a ring the frontend initialised, at index 0.
    pub fn new(mem: M) -> Result<Self, RingError> {
        Self::attach(mem, 0)
    }

    /// `BACK_RING_ATTACH`: attach with both private indices at `start` (after a reconnect, the
    /// frontend's current `rsp_prod`).
    pub fn attach(mem: M, start: RingIdx) -> Result<Self, RingError> {
        let geo = Geometry::new(mem.shared(), slot_size_of::<Req, Rsp>())?;
        Ok(BackRing {
            mem,
            geo,
            req_cons: start,
            rsp_prod_pvt: start,
            _types: PhantomData,
        })
    }

    /// Attaches where the shared ring says the backend is: both private indices at the
    /// current `rsp_prod` (the frontend's copy of what was answered), as Linux blkback does on
    /// (re)connect. Fails with [`RingError::RequestProdOverflow`] if the frontend's `req_prod`
    /// is more than a ring ahead of it.
    pub fn attach_shared(mem: M) -> Result<Self, RingError> {
        let start = mem.shared().load_u32(SRING_RSP_PROD, Ordering::Acquire)?;
        let ring = Self::attach(mem, start)?;
        ring.checked_req_prod()?;
        Ok(ring)
    }

    /// The memory the ring lives in.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// `RING_SIZE`: the number of slots.
    pub fn size(&self) -> u32 {
        self.geo.nr_ents
    }

    /// The next request to consume.
    pub fn req_cons(&self) -> RingIdx {
        self.req_cons
    }

    /// The next response slot (responses produced, not necessarily pushed).
    pub fn rsp_prod_pvt(&self) -> RingIdx {
        self.rsp_prod_pvt
    }

    /// Requests consumed and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    fn sring(&self) -> &SharedMem {
        self.mem.shared()
    }

    /// The frontend's `req_prod`, checked against `RING_REQUEST_PROD_OVERFLOW`.
    fn checked_req_prod(&self) -> Result<RingIdx, RingError> {
        let req_prod = self.sring().load_u32(SRING_REQ_PROD, Ordering::Acquire)?;
        if req_prod.wrapping_sub(self.rsp_prod_pvt) > self.geo.nr_ents {
            return Err(RingError::RequestProdOverflow {
                req_prod,
                rsp_prod_pvt: self.rsp_prod_pvt,
                size: self.geo.nr_ents,
            });
        }
        Ok(req_prod)
    }

    /// `RING_REQUEST_CONS_OVERFLOW`: consuming request `cons` would leave no slot to answer it.
    pub fn request_cons_overflow(&self, cons: RingIdx) -> bool {
        cons.wrapping_sub(self.rsp_prod_pvt) >= self.geo.nr_ents
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`: requests published and not consumed, capped by the room
    /// left to answer them. Fails if the frontend's producer index is impossible.
    pub fn unconsumed_requests(&self) -> Result<u32, RingError> {
        let req_prod = self.checked_req_prod()?;
        let req = req_prod.wrapping_sub(self.req_cons);
        let room = self.geo.nr_ents.saturating_sub(self.in_flight());
        Ok(req.min(room))
    }

    /// Copies the next request out of its slot (once, into a private value) and consumes it.
    /// `Ok(None)` if there is none, or none that could be answered.
    pub fn copy_request(&mut self) -> Result<Option<Req>, RingError> {
        if self.unconsumed_requests()? == 0 || self.request_cons_overflow(self.req_cons) {
            return Ok(None);
        }
        let req: Req = self.sring().read_obj(self.geo.offset(self.req_cons))?;
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// Writes a response into the next response slot (not yet visible to the frontend: see
    /// [`BackRing::push_responses`]).
    pub fn push_response(&mut self, rsp: &Rsp) -> Result<(), RingError> {
        self.push_response_as(rsp)
    }

    /// Writes another type into the next response slot, as protocols with several slot
    /// layouts need (netif rx: a `netif_extra_info` in place of a response).
    pub fn push_response_as<T: IntoBytes + Immutable>(&mut self, v: &T) -> Result<(), RingError> {
        if std::mem::size_of::<T>() > self.geo.slot {
            return Err(RingError::Oversized {
                size: std::mem::size_of::<T>(),
                slot: self.geo.slot,
            });
        }
        if self.in_flight() == 0 {
            return Err(RingError::NoOutstandingRequest);
        }
        self.sring()
            .write_obj(self.geo.offset(self.rsp_prod_pvt), v)?;
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_RESPONSES`: publishes the responses written so far.
    pub fn push_responses(&mut self) -> Result<(), RingError> {
        self.sring()
            .store_u32(SRING_RSP_PROD, self.rsp_prod_pvt, Ordering::Release)?;
        Ok(())
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes the responses and returns whether the
    /// frontend asked for an event (its `rsp_event` is among the newly published ones).
    pub fn push_responses_and_check_notify(&mut self) -> Result<bool, RingError> {
        let sring = self.sring();
        let old = sring.load_u32(SRING_RSP_PROD, Ordering::Relaxed)?;
        let new = self.rsp_prod_pvt;
        sring.store_u32(SRING_RSP_PROD, new, Ordering::Release)?;
        fence(Ordering::SeqCst);
        let event = sring.load_u32(SRING_RSP_EVENT, Ordering::Relaxed)?;
        Ok(need_notify(old, new, event))
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: if no request is pending, asks the frontend for an
    /// event on the next one (`req_event = req_cons + 1`) and checks once more, closing the
    /// race with a request published meanwhile. Returns whether there is work.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        self.sring().store_u32(
            SRING_REQ_EVENT,
            self.req_cons.wrapping_add(1),
            Ordering::Relaxed,
        )?;
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_requests()? > 0)
    }

    /// For a backend that has requests but needs more before it can go on (netback's RX: a
    /// frame that spans more slots than are posted): asks for an event on the *next* request
    /// the frontend publishes (`req_event = req_prod + 1`, as Linux's
    /// `xenvif_rx_ring_slots_available` does) and checks once more. Returns whether requests
    /// were published meanwhile (look again). `final_check_for_requests` would set
    /// `req_cons + 1`, which is already behind `req_prod` here, so no event would come.
    pub fn request_event_after_prod(&mut self) -> Result<bool, RingError> {
        let prod = self.checked_req_prod()?;
        self.sring()
            .store_u32(SRING_REQ_EVENT, prod.wrapping_add(1), Ordering::Relaxed)?;
        fence(Ordering::SeqCst);
        Ok(self.checked_req_prod()? != prod)
    }
}

/// The frontend end of a shared ring: produces requests, consumes responses. domio uses it in
/// xensim's guest drivers and in tests; it treats the backend as untrusted too.
#[derive(Debug)]
pub struct FrontRing<Req, Rsp, M = SharedMem> {
    mem: M,
    geo: Geometry,
    req_prod_pvt: RingIdx,
    rsp_cons: RingIdx,
    _types: PhantomData<fn(Req) -> Rsp>,
}

impl<Req, Rsp, M> FrontRing<Req, Rsp, M>
where
    Req: IntoBytes + Immutable,
    Rsp: FromBytes + IntoBytes,
    M: RingMemory,
{
    /// `XEN_FRONT_RING_INIT`: initialises the shared header and attaches at index 0.
    pub fn init(mem: M) -> Result<Self, RingError> {
        Self::init_at(mem, 0)
    }

    /// Initialises the shared header with both producers at `start` and attaches there.
    pub fn init_at(mem: M, start: RingIdx) -> Result<Self, RingError> {
        let ring = Self::attach(mem, start)?;
        init_shared_ring(ring.sring(), start)?;
        Ok(ring)
    }

    /// `FRONT_RING_ATTACH`: attaches to an initialised ring with both indices at `start`.
    pub fn attach(mem: M, start: RingIdx) -> Result<Self, RingError> {
        let geo = Geometry::new(mem.shared(), slot_size_of::<Req, Rsp>())?;
        Ok(FrontRing {
            mem,
            geo,
            req_prod_pvt: start,
            rsp_cons: start,
            _types: PhantomData,
        })
    }

    /// The memory the ring lives in.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// `RING_SIZE`.
    pub fn size(&self) -> u32 {
        self.geo.nr_ents
    }

    /// The next request slot (requests produced, not necessarily pushed).
    pub fn req_prod_pvt(&self) -> RingIdx {
        self.req_prod_pvt
    }

    /// The next response to consume.
    pub fn rsp_cons(&self) -> RingIdx {
        self.rsp_cons
    }

    fn sring(&self) -> &SharedMem {
        self.mem.shared()
    }

    fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// `RING_FREE_REQUESTS`.
    pub fn free_requests(&self) -> u32 {
        self.geo.nr_ents.saturating_sub(self.outstanding())
    }

    /// `RING_FULL`.
    pub fn is_full(&self) -> bool {
        self.free_requests() == 0
    }

    /// Writes a request into the next slot (not yet visible: see
    /// [`FrontRing::push_requests`]). Fails with [`RingError::Full`] if no slot is free.
    pub fn push_request(&mut self, req: &Req) -> Result<(), RingError> {
        self.push_request_as(req)
    }

    /// Writes another type into the next request slot (netif tx: a `netif_extra_info`).
    pub fn push_request_as<T: IntoBytes + Immutable>(&mut self, v: &T) -> Result<(), RingError> {
        if std::mem::size_of::<T>() > self.geo.slot {
            return Err(RingError::Oversized {
                size: std::mem::size_of::<T>(),
                slot: self.geo.slot,
            });
        }
        if self.is_full() {
            return Err(RingError::Full);
        }
        self.sring()
            .write_obj(self.geo.offset(self.req_prod_pvt), v)?;
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_REQUESTS`.
    pub fn push_requests(&mut self) -> Result<(), RingError> {
        self.sring()
            .store_u32(SRING_REQ_PROD, self.req_prod_pvt, Ordering::Release)?;
        Ok(())
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publishes and returns whether the backend asked
    /// for an event.
    pub fn push_requests_and_check_notify(&mut self) -> Result<bool, RingError> {
        let sring = self.sring();
        let old = sring.load_u32(SRING_REQ_PROD, Ordering::Relaxed)?;
        let new = self.req_prod_pvt;
        sring.store_u32(SRING_REQ_PROD, new, Ordering::Release)?;
        fence(Ordering::SeqCst);
        let event = sring.load_u32(SRING_REQ_EVENT, Ordering::Relaxed)?;
        Ok(need_notify(old, new, event))
    }

    /// `RING_HAS_UNCONSUMED_RESPONSES`, checked: fails if the backend claims responses to
    /// requests we never pushed (`RING_RESPONSE_PROD_OVERFLOW`).
    pub fn unconsumed_responses(&self) -> Result<u32, RingError> {
        let rsp_prod = self.sring().load_u32(SRING_RSP_PROD, Ordering::Acquire)?;
        let n = rsp_prod.wrapping_sub(self.rsp_cons);
        if n > self.outstanding() {
            return Err(RingError::ResponseProdOverflow {
                rsp_prod,
                rsp_cons: self.rsp_cons,
                outstanding: self.outstanding(),
            });
        }
        Ok(n)
    }

    /// Copies the next response out (once) and consumes it; `Ok(None)` if there is none.
    pub fn get_response(&mut self) -> Result<Option<Rsp>, RingError> {
        if self.unconsumed_responses()? == 0 {
            return Ok(None);
        }
        let rsp: Rsp = self.sring().read_obj(self.geo.offset(self.rsp_cons))?;
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: sets `rsp_event = rsp_cons + 1` when idle and checks
    /// again. Returns whether there are responses.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_responses()? > 0 {
            return Ok(true);
        }
        self.sring().store_u32(
            SRING_RSP_EVENT,
            self.rsp_cons.wrapping_add(1),
            Ordering::Relaxed,
        )?;
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_responses()? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::blkif::{BlkifRequest, BlkifResponse, BlkifX86_32Request, BlkifX86_32Response};
    use crate::abi::netif::{
        NetifExtraGso, NetifExtraInfo, NetifRxRequest, NetifRxResponse, NetifTxRequest,
        NetifTxResponse,
    };
    use crate::PAGE_SIZE;
    use proptest::prelude::*;

    type Front<'a> = FrontRing<u64, u64, &'a SharedMem>;
    type Back<'a> = BackRing<u64, u64, &'a SharedMem>;

    /// Memory for a ring of `slots` 8-byte slots.
    fn ring_mem(slots: usize) -> SharedMem {
        SharedMem::anonymous(SRING_RING_OFFSET + 8 * slots).expect("anonymous mapping")
    }

    fn header(mem: &SharedMem, off: usize) -> u32 {
        mem.load_u32(off, Ordering::Relaxed).unwrap()
    }

    #[test]
    fn test_ring_size_for_1_to_16_pages_is_rounded_down_power_of_two() {
        for pages in 1..=16usize {
            let bytes = pages * PAGE_SIZE;
            let mem = SharedMem::anonymous(bytes).unwrap();

            let ring: BackRing<BlkifRequest, BlkifResponse, _> = BackRing::new(&mem).unwrap();

            let raw = ((bytes - 64) / 112) as u32;
            let expected = 1u32 << (31 - raw.leading_zeros());
            assert_eq!(ring.size(), expected, "{pages} pages");
            assert!(expected <= raw && raw < 2 * expected);
            // Linux blkback's ring sizes for ring orders 0..=4: 32 entries per page.
            if pages.is_power_of_two() {
                assert_eq!(ring.size(), 32 * pages as u32);
            }
        }
        assert_eq!(
            ring_size_of::<BlkifX86_32Request, BlkifX86_32Response>(PAGE_SIZE),
            32
        );
        assert_eq!(
            ring_size_of::<NetifTxRequest, NetifTxResponse>(PAGE_SIZE),
            256
        );
        assert_eq!(
            ring_size_of::<NetifRxRequest, NetifRxResponse>(PAGE_SIZE),
            256
        );
    }

    #[test]
    fn test_ring_attach_memory_too_small_is_refused() {
        let mem = SharedMem::anonymous(64).unwrap();

        let r: Result<Back<'_>, _> = BackRing::new(&mem);

        assert_eq!(r.err(), Some(RingError::TooSmall { len: 64, slot: 8 }));
    }

    #[test]
    fn test_back_ring_rogue_req_prod_is_reported_not_consumed() {
        let mem = ring_mem(8);
        let _front: Front<'_> = FrontRing::init(&mem).unwrap();
        let mut back: Back<'_> = BackRing::new(&mem).unwrap();
        // A rogue frontend claims 9 requests in an 8-slot ring.
        mem.store_u32(SRING_REQ_PROD, 9, Ordering::Release).unwrap();

        let unconsumed = back.unconsumed_requests();
        let copied = back.copy_request();
        let final_check = back.final_check_for_requests();

        let expected = RingError::RequestProdOverflow {
            req_prod: 9,
            rsp_prod_pvt: 0,
            size: 8,
        };
        assert_eq!(unconsumed, Err(expected));
        assert_eq!(copied, Err(expected));
        assert_eq!(final_check, Err(expected));
        assert_eq!(back.req_cons(), 0);
    }

    #[test]
    fn test_back_ring_rogue_req_prod_behind_is_reported() {
        let mem = ring_mem(8);
        let _front: Front<'_> = FrontRing::init_at(&mem, 100).unwrap();
        let mut back: Back<'_> = BackRing::attach(&mem, 100).unwrap();
        // req_prod moving backwards looks like 2^32 - 1 new requests.
        mem.store_u32(SRING_REQ_PROD, 99, Ordering::Release)
            .unwrap();

        let r = back.copy_request();

        assert!(matches!(
            r,
            Err(RingError::RequestProdOverflow { req_prod: 99, .. })
        ));
    }

    #[test]
    fn test_back_ring_full_ring_without_responses_stops_consuming() {
        let mem = ring_mem(4);
        let mut front: Front<'_> = FrontRing::init_at(&mem, u32::MAX - 1).unwrap();
        let mut back: Back<'_> = BackRing::attach(&mem, u32::MAX - 1).unwrap();
        for i in 0..4 {
            front.push_request(&i).unwrap();
        }
        front.push_requests().unwrap();

        let got: Vec<u64> = std::iter::from_fn(|| back.copy_request().unwrap()).collect();

        assert_eq!(got, vec![0, 1, 2, 3]);
        assert_eq!(back.req_cons(), 2);
        assert!(back.request_cons_overflow(back.req_cons()));
        assert_eq!(front.push_request(&9), Err(RingError::Full));
        assert_eq!(back.push_response(&7), Ok(()));
        assert_eq!(back.in_flight(), 3);
    }

    #[test]
    fn test_back_ring_attach_shared_starts_at_rsp_prod_and_checks_req_prod() {
        let mem = ring_mem(8);
        let mut front: Front<'_> = FrontRing::init_at(&mem, 0xffff_fffe).unwrap();
        for i in 0..3 {
            front.push_request(&i).unwrap();
        }
        front.push_requests().unwrap();

        let mut back: Back<'_> = BackRing::attach_shared(&mem).unwrap();
        let start = back.req_cons();
        let first = back.copy_request().unwrap();
        let rogue_prod = 0xffff_fffe_u32.wrapping_add(9);
        mem.store_u32(SRING_REQ_PROD, rogue_prod, Ordering::Release)
            .unwrap();
        let rogue: Result<Back<'_>, _> = BackRing::attach_shared(&mem);

        assert_eq!(start, 0xffff_fffe);
        assert_eq!(first, Some(0));
        assert!(matches!(
            rogue,
            Err(RingError::RequestProdOverflow { size: 8, .. })
        ));
    }

    #[test]
    fn test_back_ring_concurrent_flipping_frontend_never_panics_or_overconsumes() {
        // A hostile frontend thread rewrites req_prod, req_event and the slots as fast as it
        // can while the backend consumes and answers (XSA-155 / XSA-39 at the ring level).
        let mem = std::sync::Arc::new(ring_mem(8));
        let _front: FrontRing<u64, u64, &SharedMem> = FrontRing::init(&*mem).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flips = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flipper = {
            let (mem, stop, flips) = (mem.clone(), stop.clone(), flips.clone());
            std::thread::spawn(move || {
                let mut x: u32 = 0x9e37_79b9;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let _ = mem.store_u32(SRING_REQ_PROD, x % 24, Ordering::Release);
                    let _ = mem.store_u32(SRING_REQ_EVENT, x, Ordering::Relaxed);
                    let slot = SRING_RING_OFFSET + (x as usize % 8) * 8;
                    let _ = mem.write_obj(slot, &u64::from(x));
                    flips.fetch_add(1, Ordering::Release);
                }
            })
        };
        let mut back: BackRing<u64, u64, &SharedMem> = BackRing::new(&*mem).unwrap();
        let (mut consumed, mut overflows) = (0u64, 0u64);
        // Start once the hostile writes have begun (a spin on the flipper's progress).
        while flips.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }

        // Run until the flipper has made many writes while we consume (not a fixed number of
        // our own iterations: under load the flipper may not run for a while), with a cap.
        let start = flips.load(Ordering::Acquire);
        let mut i = 0u64;
        while (i < 20_000 || flips.load(Ordering::Acquire) < start + 2_000) && i < 200_000_000 {
            i += 1;
            match back.copy_request() {
                Ok(Some(_)) => consumed += 1,
                Ok(None) => {}
                Err(RingError::RequestProdOverflow { .. }) => overflows += 1,
                Err(e) => panic!("unexpected {e}"),
            }
            assert!(back.in_flight() <= back.size());
            if i.is_multiple_of(3) && back.in_flight() > 0 {
                back.push_response(&i).unwrap();
                let _ = back.push_responses_and_check_notify().unwrap();
            }
            let _ = back.final_check_for_requests();
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();

        assert!(consumed + overflows > 0);
        assert!(back.in_flight() <= 8);
    }

    #[test]
    fn test_request_event_after_prod_gets_an_event_for_the_next_request_posted() {
        // A backend holds 2 of 3 posted requests back (it needs more for one frame). With
        // the final check's req_cons + 1 the frontend's next push would not notify; with
        // request_event_after_prod it does.
        for after_prod in [false, true] {
            let mem = ring_mem(8);
            let mut front: FrontRing<u64, u64, &SharedMem> = FrontRing::init(&mem).unwrap();
            let mut back: BackRing<u64, u64, &SharedMem> = BackRing::new(&mem).unwrap();
            for i in 0..3u64 {
                front.push_request(&i).unwrap();
            }
            front.push_requests_and_check_notify().unwrap();
            assert_eq!(back.copy_request().unwrap(), Some(0));
            if after_prod {
                assert!(!back.request_event_after_prod().unwrap());
            } else {
                assert!(back.final_check_for_requests().unwrap(), "2 are pending");
            }
            front.push_request(&3).unwrap();
            let notified = front.push_requests_and_check_notify().unwrap();
            assert_eq!(notified, after_prod);
        }
    }

    #[test]
    fn test_netif_rx_extra_info_pushed_as_response_reads_back_through_view() {
        let mem = SharedMem::anonymous(PAGE_SIZE).unwrap();
        let mut front: FrontRing<NetifRxRequest, NetifRxResponse, _> =
            FrontRing::init(&mem).unwrap();
        let mut back: BackRing<NetifRxRequest, NetifRxResponse, _> = BackRing::new(&mem).unwrap();
        front
            .push_request(&NetifRxRequest {
                id: 1,
                pad: 0,
                gref: 9,
            })
            .unwrap();
        front.push_requests().unwrap();
        back.copy_request().unwrap().unwrap();
        let gso = NetifExtraGso {
            size: 1448,
            type_: 1,
            pad: 0,
            features: 0,
        };

        back.push_response_as(&NetifExtraInfo::new_gso(0, &gso))
            .unwrap();
        back.push_responses().unwrap();
        let rsp = front.get_response().unwrap().unwrap();
        let too_big = back.push_response_as(&[0u64; 2]);

        assert_eq!(rsp.as_extra_info().gso(), gso);
        assert_eq!(too_big, Err(RingError::Oversized { size: 16, slot: 8 }));
    }

    #[test]
    fn test_back_ring_response_without_request_is_refused() {
        let mem = ring_mem(4);
        let _front: Front<'_> = FrontRing::init(&mem).unwrap();
        let mut back: Back<'_> = BackRing::new(&mem).unwrap();

        let r = back.push_response(&1);

        assert_eq!(r, Err(RingError::NoOutstandingRequest));
        assert_eq!(back.rsp_prod_pvt(), 0);
    }

    #[test]
    fn test_front_ring_rogue_rsp_prod_is_reported() {
        let mem = ring_mem(4);
        let mut front: Front<'_> = FrontRing::init(&mem).unwrap();
        front.push_request(&1).unwrap();
        front.push_requests().unwrap();
        // A rogue backend answers two requests when one was sent.
        mem.store_u32(SRING_RSP_PROD, 2, Ordering::Release).unwrap();

        let r = front.get_response();

        assert_eq!(
            r,
            Err(RingError::ResponseProdOverflow {
                rsp_prod: 2,
                rsp_cons: 0,
                outstanding: 1
            })
        );
    }

    #[test]
    fn test_ring_slot_contents_are_copied_once_and_private() {
        let mem = ring_mem(4);
        let mut front: Front<'_> = FrontRing::init(&mem).unwrap();
        let mut back: Back<'_> = BackRing::new(&mem).unwrap();
        front.push_request(&0x1111).unwrap();
        front.push_requests().unwrap();

        let req = back.copy_request().unwrap().unwrap();
        // The frontend rewrites the slot after the copy: the private value must not change.
        mem.write_obj(SRING_RING_OFFSET, &0x2222u64).unwrap();

        assert_eq!(req, 0x1111);
    }

    #[test]
    fn test_init_shared_ring_sets_events_one_past_start() {
        let mem = ring_mem(4);
        mem.fill(0, 64, 0xff).unwrap();

        let _front: Front<'_> = FrontRing::init_at(&mem, u32::MAX).unwrap();

        assert_eq!(header(&mem, SRING_REQ_PROD), u32::MAX);
        assert_eq!(header(&mem, SRING_RSP_PROD), u32::MAX);
        assert_eq!(header(&mem, SRING_REQ_EVENT), 0);
        assert_eq!(header(&mem, SRING_RSP_EVENT), 0);
        let mut pad = [0u8; 48];
        mem.read(16, &mut pad).unwrap();
        assert_eq!(pad, [0u8; 48]);
    }

    /// A reference model of the ring.h macros on plain integers.
    #[derive(Debug, Clone)]
    struct Model {
        size: u32,
        req_prod: u32,
        req_event: u32,
        rsp_prod: u32,
        rsp_event: u32,
        req_prod_pvt: u32,
        rsp_cons: u32,
        req_cons: u32,
        rsp_prod_pvt: u32,
    }

    impl Model {
        fn new(size: u32, start: u32) -> Self {
            Model {
                size,
                req_prod: start,
                req_event: start.wrapping_add(1),
                rsp_prod: start,
                rsp_event: start.wrapping_add(1),
                req_prod_pvt: start,
                rsp_cons: start,
                req_cons: start,
                rsp_prod_pvt: start,
            }
        }
        fn free_requests(&self) -> u32 {
            self.size - (self.req_prod_pvt.wrapping_sub(self.rsp_cons))
        }
        fn unconsumed_requests(&self) -> u32 {
            let req = self.req_prod.wrapping_sub(self.req_cons);
            let rsp = self.size - self.req_cons.wrapping_sub(self.rsp_prod_pvt);
            req.min(rsp)
        }
        fn unconsumed_responses(&self) -> u32 {
            self.rsp_prod.wrapping_sub(self.rsp_cons)
        }
        fn push_requests_and_check_notify(&mut self) -> bool {
            let old = self.req_prod;
            let new = self.req_prod_pvt;
            self.req_prod = new;
            new.wrapping_sub(self.req_event) < new.wrapping_sub(old)
        }
        fn push_responses_and_check_notify(&mut self) -> bool {
            let old = self.rsp_prod;
            let new = self.rsp_prod_pvt;
            self.rsp_prod = new;
            new.wrapping_sub(self.rsp_event) < new.wrapping_sub(old)
        }
        fn final_check_for_requests(&mut self) -> bool {
            if self.unconsumed_requests() > 0 {
                return true;
            }
            self.req_event = self.req_cons.wrapping_add(1);
            self.unconsumed_requests() > 0
        }
        fn final_check_for_responses(&mut self) -> bool {
            if self.unconsumed_responses() > 0 {
                return true;
            }
            self.rsp_event = self.rsp_cons.wrapping_add(1);
            self.unconsumed_responses() > 0
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        FrontPush(u32),
        BackConsume(u32),
        BackRespond(u32),
        FrontConsume(u32),
        BackFinalCheck,
        FrontFinalCheck,
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..20).prop_map(Op::FrontPush),
            (0u32..20).prop_map(Op::BackConsume),
            (0u32..20).prop_map(Op::BackRespond),
            (0u32..20).prop_map(Op::FrontConsume),
            Just(Op::BackFinalCheck),
            Just(Op::FrontFinalCheck),
        ]
    }

    fn start_strategy() -> impl Strategy<Value = u32> {
        prop_oneof![
            (0u32..64).prop_map(|k| u32::MAX - k),
            (0u32..64).prop_map(|k| (1u32 << 31).wrapping_sub(k)),
            any::<u32>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Front and back rings over one memory, driven by random interleavings starting near
        /// the 2^32 wrap, agree with the reference model of the macros on every count, index
        /// and notify decision, and deliver every request and response once, in order.
        #[test]
        fn test_ring_random_interleavings_at_wraparound_match_reference_model(
            slots_log2 in 0u32..5,
            start in start_strategy(),
            ops in proptest::collection::vec(op_strategy(), 1..200),
        ) {
            let slots = 1usize << slots_log2;
            let mem = ring_mem(slots);
            let mut front: Front<'_> = FrontRing::init_at(&mem, start).unwrap();
            let mut back: Back<'_> = BackRing::attach(&mem, start).unwrap();
            let mut model = Model::new(slots as u32, start);
            let mut next_req = 0u64;
            let mut next_seen_req = 0u64;
            let mut next_rsp = 0u64;
            let mut next_seen_rsp = 0u64;
            prop_assert_eq!(front.size(), slots as u32);

            for op in ops {
                match op {
                    Op::FrontPush(n) => {
                        let n = n.min(model.free_requests());
                        for _ in 0..n {
                            front.push_request(&next_req).unwrap();
                            next_req += 1;
                        }
                        model.req_prod_pvt = model.req_prod_pvt.wrapping_add(n);
                        if model.free_requests() == 0 {
                            prop_assert_eq!(front.push_request(&u64::MAX), Err(RingError::Full));
                        }
                        let notify = front.push_requests_and_check_notify().unwrap();
                        prop_assert_eq!(notify, model.push_requests_and_check_notify());
                    }
                    Op::BackConsume(n) => {
                        prop_assert_eq!(back.unconsumed_requests().unwrap(), model.unconsumed_requests());
                        let avail = n.min(model.unconsumed_requests());
                        for _ in 0..avail {
                            let req = back.copy_request().unwrap();
                            prop_assert_eq!(req, Some(next_seen_req));
                            next_seen_req += 1;
                        }
                        model.req_cons = model.req_cons.wrapping_add(avail);
                        if model.unconsumed_requests() == 0 {
                            prop_assert_eq!(back.copy_request().unwrap(), None);
                        }
                    }
                    Op::BackRespond(n) => {
                        let in_flight = model.req_cons.wrapping_sub(model.rsp_prod_pvt);
                        let k = n.min(in_flight);
                        for _ in 0..k {
                            back.push_response(&next_rsp).unwrap();
                            next_rsp += 1;
                        }
                        model.rsp_prod_pvt = model.rsp_prod_pvt.wrapping_add(k);
                        if k == in_flight {
                            prop_assert_eq!(back.push_response(&0), Err(RingError::NoOutstandingRequest));
                        }
                        let notify = back.push_responses_and_check_notify().unwrap();
                        prop_assert_eq!(notify, model.push_responses_and_check_notify());
                    }
                    Op::FrontConsume(n) => {
                        prop_assert_eq!(front.unconsumed_responses().unwrap(), model.unconsumed_responses());
                        let k = n.min(model.unconsumed_responses());
                        for _ in 0..k {
                            let rsp = front.get_response().unwrap();
                            prop_assert_eq!(rsp, Some(next_seen_rsp));
                            next_seen_rsp += 1;
                        }
                        model.rsp_cons = model.rsp_cons.wrapping_add(k);
                        if model.unconsumed_responses() == 0 {
                            prop_assert_eq!(front.get_response().unwrap(), None);
                        }
                    }
                    Op::BackFinalCheck => {
                        prop_assert_eq!(back.final_check_for_requests().unwrap(), model.final_check_for_requests());
                    }
                    Op::FrontFinalCheck => {
                        prop_assert_eq!(front.final_check_for_responses().unwrap(), model.final_check_for_responses());
                    }
                }
                prop_assert_eq!(header(&mem, SRING_REQ_PROD), model.req_prod);
                prop_assert_eq!(header(&mem, SRING_REQ_EVENT), model.req_event);
                prop_assert_eq!(header(&mem, SRING_RSP_PROD), model.rsp_prod);
                prop_assert_eq!(header(&mem, SRING_RSP_EVENT), model.rsp_event);
                prop_assert_eq!(front.free_requests(), model.free_requests());
                prop_assert_eq!(back.req_cons(), model.req_cons);
                prop_assert_eq!(back.rsp_prod_pvt(), model.rsp_prod_pvt);
                prop_assert_eq!(front.req_prod_pvt(), model.req_prod_pvt);
                prop_assert_eq!(front.rsp_cons(), model.rsp_cons);
            }
        }

        /// Whatever a hostile frontend writes into the header, the back ring never panics,
        /// never consumes more than the ring holds beyond its responses, and reports an
        /// impossible producer as RequestProdOverflow.
        #[test]
        fn test_back_ring_arbitrary_header_never_panics_or_overconsumes(
            start in any::<u32>(),
            req_prod in any::<u32>(),
            req_event in any::<u32>(),
            rsp_event in any::<u32>(),
        ) {
            let mem = ring_mem(8);
            let _front: Front<'_> = FrontRing::init_at(&mem, start).unwrap();
            let mut back: Back<'_> = BackRing::attach(&mem, start).unwrap();
            mem.store_u32(SRING_REQ_PROD, req_prod, Ordering::Release).unwrap();
            mem.store_u32(SRING_REQ_EVENT, req_event, Ordering::Release).unwrap();
            mem.store_u32(SRING_RSP_EVENT, rsp_event, Ordering::Release).unwrap();

            let mut consumed = 0u32;
            let outcome = loop {
                match back.copy_request() {
                    Ok(Some(_)) => consumed += 1,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
                prop_assert!(consumed <= 8);
            };
            let _ = back.push_responses_and_check_notify();
            let _ = back.final_check_for_requests();

            let ahead = req_prod.wrapping_sub(start);
            if ahead > 8 {
                prop_assert!(
                    matches!(outcome, Err(RingError::RequestProdOverflow { .. })),
                    "expected overflow for req_prod {} start {}, got {:?}",
                    req_prod,
                    start,
                    outcome
                );
                prop_assert_eq!(consumed, 0);
            } else {
                prop_assert_eq!(outcome, Ok(()));
                prop_assert_eq!(consumed, ahead);
            }
        }
    }

    #[test]
    fn test_need_notify_event_in_published_window_only() {
        assert!(need_notify(10, 12, 11));
        assert!(need_notify(10, 12, 12));
        assert!(!need_notify(10, 12, 10));
        assert!(!need_notify(10, 12, 13));
        assert!(need_notify(u32::MAX, 1, 0));
        assert!(!need_notify(5, 5, 5));
    }
}
