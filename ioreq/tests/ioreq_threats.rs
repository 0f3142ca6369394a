//! THREATS.md §5 rows about the ioreq server, each named after its XSA, and the other
//! hostile-guest cases: every malformed ioreq is answered, the vCPU never hangs, and the
//! server goes on serving.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use ioreq::guestmem::GuestMemory;
use ioreq::{Dispatcher, IoAccess, IoHandler, IoreqStats, RangeError};
use xen::abi::ioreq::*;
use xen::{DomId, ForeignError, ForeignMemory, Gfn, IoRange, Resource, SharedMem};
use xensim::hvm::HvmBus;

/// The server's two ioreq pages (buffered, then the vCPUs' slots from offset 4096), as Xen
/// maps them for the guest side.
fn ioreq_pages(r: &Rig) -> xen::SharedMem {
    r.host
        .hvm_domain(r.domid)
        .unwrap()
        .map_resource(0, r.ioreq.id(), 0, 2)
        .unwrap()
}

#[allow(clippy::too_many_arguments)]
fn raw(
    type_: u8,
    addr: u64,
    size: u32,
    count: u32,
    dir: u8,
    ptr: bool,
    df: bool,
    data: u64,
) -> Ioreq {
    Ioreq {
        addr,
        data,
        count,
        size,
        bits: Ioreq::make_bits(STATE_IOREQ_READY, ptr, dir, df),
        type_,
        ..Default::default()
    }
}

#[test]
fn xsa197_slot_mutated_during_dispatch_uses_one_snapshot() {
    let r = rig();
    let data: Vec<u8> = (10..18u8).collect();
    r.guest.ram_write(0x10_0000, &data).unwrap();
    let page = ioreq_pages(&r);
    let mutated = Arc::new(AtomicUsize::new(0));
    let m = mutated.clone();
    r.dev.st().hook = Some(Box::new(move |_a: &IoAccess| {
        // Rewrite vCPU 0's slot under the server's feet: another port, size, count, type,
        // buffer. The state byte is left alone.
        let slot = 4096;
        page.store_u64(slot, 0x100, Ordering::SeqCst).unwrap();
        page.store_u64(slot + 8, 0x20_0000, Ordering::SeqCst)
            .unwrap();
        page.store_u32(slot + 16, 4096, Ordering::SeqCst).unwrap();
        page.store_u32(slot + 20, 4, Ordering::SeqCst).unwrap();
        page.store_u8(slot + 31, IOREQ_TYPE_COPY, Ordering::SeqCst)
            .unwrap();
        m.fetch_add(1, Ordering::SeqCst);
    }));
    r.guest.rep_outs(FIFO_PORT, 1, 8, 0x10_0000, false).unwrap();
    r.dev.st().hook = None;
    assert_eq!(mutated.load(Ordering::SeqCst), 8);
    let st = r.dev.st();
    assert_eq!(
        st.fifo_out,
        data.iter().map(|b| u64::from(*b)).collect::<Vec<_>>()
    );
    assert!(st
        .accesses
        .iter()
        .all(|(a, w, _)| *w && a.addr == u64::from(FIFO_PORT) && a.size == 1));
    assert_eq!(st.ports, [0; 8]);
}

#[test]
fn xsa199_pio_at_0xffff_size4_and_0x10000_ignored_reads_all_ones() {
    let r = rig();
    let id = r.ioreq.id();
    assert_eq!(
        r.guest
            .send_raw(
                id,
                raw(IOREQ_TYPE_PIO, 0xffff, 4, 1, IOREQ_READ, false, false, 0)
            )
            .unwrap(),
        u64::MAX
    );
    assert_eq!(
        r.guest
            .send_raw(
                id,
                raw(IOREQ_TYPE_PIO, 0x10000, 1, 1, IOREQ_READ, false, false, 0)
            )
            .unwrap(),
        u64::MAX
    );
    r.guest
        .send_raw(
            id,
            raw(IOREQ_TYPE_PIO, 0xffff, 4, 1, IOREQ_WRITE, false, false, 7),
        )
        .unwrap();
    r.guest
        .send_raw(
            id,
            raw(IOREQ_TYPE_PIO, 0x1_0100, 1, 1, IOREQ_WRITE, false, false, 7),
        )
        .unwrap();
    // Ports do not wrap into the scratch registers (0x1_0100 & 0xffff == 0x100).
    assert!(r.dev.st().accesses.is_empty());
    assert_eq!(r.ioreq.stats().bad.load(Ordering::Relaxed), 4);
    // The server goes on.
    r.guest.pio_write(SCRATCH_PORT, 1, 5).unwrap();
    assert_eq!(r.guest.pio_read(SCRATCH_PORT, 1).unwrap(), 5);
}

#[test]
fn xsa262_state_moves_ready_inprocess_iorespready_only() {
    let r = rig();
    let page = ioreq_pages(&r);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    r.dev.st().hook = Some(Box::new(move |_a: &IoAccess| {
        let st = page
            .load_u8(4096 + IOREQ_STATE_OFFSET, Ordering::SeqCst)
            .unwrap()
            & 0xf;
        s2.lock().unwrap().push(st);
    }));
    for i in 0..200u32 {
        r.guest.pio_write(SCRATCH_PORT, 4, i).unwrap();
        assert_eq!(r.guest.pio_read(SCRATCH_PORT, 4).unwrap(), i);
    }
    r.dev.st().hook = None;
    // During dispatch the slot is INPROCESS; xensim's vCPU checks every state it sees moves
    // forward (it crashes the domain otherwise), and the slot is free again after each.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 400);
    assert!(seen.iter().all(|s| *s == STATE_IOREQ_INPROCESS));
    assert_eq!(r.host.hvm_domain(r.domid).unwrap().crashed(), None);
    let page = ioreq_pages(&r);
    assert_eq!(
        page.load_u8(4096 + IOREQ_STATE_OFFSET, Ordering::SeqCst)
            .unwrap()
            & 0xf,
        STATE_IOREQ_NONE
    );
}

#[test]
fn xsa238_registry_refuses_end_before_start_and_all_ones_bars() {
    let r = rig();
    let reg = r.ioreq.ranges();
    for bad in [
        IoRange::Port {
            start: 0x20,
            end: 0x10,
        },
        IoRange::Mmio {
            start: 0xfe00_1000,
            end: 0xfe00_0fff,
        },
        IoRange::Mmio {
            start: 0xffff_ffff,
            end: 0xffff_ffff,
        },
        IoRange::Mmio {
            start: 0xffff_fff0,
            end: u64::MAX,
        },
        IoRange::Port {
            start: 0xfff0,
            end: 0x1_000f,
        },
        IoRange::Pci {
            seg: 0,
            bus: 0,
            dev: 32,
            func: 0,
        },
    ] {
        assert!(
            matches!(reg.map(bad), Err(RangeError::Invalid { .. })),
            "{bad:?}"
        );
    }
    let srv = r
        .host
        .hvm_domain(r.domid)
        .unwrap()
        .server(r.ioreq.id())
        .unwrap();
    assert_eq!(
        srv.ranges(1),
        vec![
            (VGA_BASE, VGA_BASE + 0xfff),
            (MMIO_BASE, MMIO_BASE + MMIO_LEN - 1)
        ]
    );
}

#[test]
fn test_unknown_type_and_bad_sizes_are_answered_and_server_goes_on() {
    let r = rig();
    let id = r.ioreq.id();
    for t in [3u8, 4, 5, 6, 9, 0xff] {
        assert_eq!(
            r.guest
                .send_raw(id, raw(t, 0x100, 4, 1, IOREQ_READ, false, false, 0))
                .unwrap(),
            u64::MAX
        );
    }
    for size in [0u32, 3, 5, 16, u32::MAX] {
        assert_eq!(
            r.guest
                .send_raw(
                    id,
                    raw(IOREQ_TYPE_PIO, 0x100, size, 1, IOREQ_READ, false, false, 0)
                )
                .unwrap(),
            u64::MAX
        );
    }
    // 8-byte port I/O does not exist; config accesses with count != 1 neither.
    assert_eq!(
        r.guest
            .send_raw(
                id,
                raw(IOREQ_TYPE_PIO, 0x100, 8, 1, IOREQ_READ, false, false, 0)
            )
            .unwrap(),
        u64::MAX
    );
    let cfg = (u64::from(PCI_DEV.to_u32()) << 32) | 0xffe;
    assert_eq!(
        r.guest
            .send_raw(
                id,
                raw(
                    IOREQ_TYPE_PCI_CONFIG,
                    cfg,
                    4,
                    1,
                    IOREQ_READ,
                    false,
                    false,
                    0
                )
            )
            .unwrap(),
        u64::MAX
    );
    assert_eq!(
        r.guest
            .send_raw(
                id,
                raw(
                    IOREQ_TYPE_PCI_CONFIG,
                    cfg & !0xfff,
                    4,
                    2,
                    IOREQ_READ,
                    false,
                    false,
                    0
                )
            )
            .unwrap(),
        u64::MAX
    );
    assert!(r.dev.st().accesses.is_empty());
    assert_eq!(r.ioreq.stats().bad.load(Ordering::Relaxed), 14);
    assert_eq!(r.guest.pio_read(0xcfc, 4).unwrap(), 0xffff_ffff);
    r.guest.mmio_write(MMIO_BASE, 4, 9).unwrap();
    assert_eq!(r.guest.mmio_read(MMIO_BASE, 4).unwrap(), 9);
}

#[test]
fn test_rep_count_past_guest_memory_is_refused_without_touching_ram() {
    let r = rig();
    let id = r.ioreq.id();
    let ram = r.guest.ram_size();
    let marker = [0x5au8; 16];
    r.guest.ram_write(ram - 16, &marker).unwrap();
    // rep insd of 8 dwords starting 16 bytes before the end: runs 16 bytes past RAM.
    r.guest
        .send_raw(
            id,
            raw(
                IOREQ_TYPE_PIO,
                u64::from(FIFO_PORT),
                4,
                8,
                IOREQ_READ,
                true,
                false,
                ram - 16,
            ),
        )
        .unwrap();
    // df=1 running below address 0.
    r.guest
        .send_raw(
            id,
            raw(
                IOREQ_TYPE_PIO,
                u64::from(FIFO_PORT),
                4,
                8,
                IOREQ_READ,
                true,
                true,
                8,
            ),
        )
        .unwrap();
    // A count above Xen's 4096 cap, and one whose buffer wraps the address space.
    r.guest
        .send_raw(
            id,
            raw(
                IOREQ_TYPE_PIO,
                u64::from(FIFO_PORT),
                1,
                4097,
                IOREQ_WRITE,
                true,
                false,
                0,
            ),
        )
        .unwrap();
    r.guest
        .send_raw(
            id,
            raw(
                IOREQ_TYPE_COPY,
                MMIO_BASE,
                8,
                4096,
                IOREQ_WRITE,
                true,
                false,
                u64::MAX - 8,
            ),
        )
        .unwrap();
    r.guest
        .send_raw(
            id,
            raw(
                IOREQ_TYPE_COPY,
                MMIO_BASE,
                8,
                0,
                IOREQ_WRITE,
                true,
                false,
                0,
            ),
        )
        .unwrap();
    let mut got = [0u8; 16];
    r.guest.ram_read(ram - 16, &mut got).unwrap();
    assert_eq!(got, marker);
    assert!(r.dev.st().accesses.is_empty());
    assert_eq!(r.ioreq.stats().bad.load(Ordering::Relaxed), 5);
    // Exactly up to the end is fine.
    r.guest.rep_ins(FIFO_PORT, 4, 4, ram - 16, false).unwrap();
    r.guest.ram_read(ram - 16, &mut got).unwrap();
    assert_eq!(&got[..4], &1u32.to_le_bytes());
}

#[test]
fn test_thousands_of_malformed_ioreqs_each_complete() {
    let r = rig();
    let id = r.ioreq.id();
    for i in 0..2000u32 {
        let v = r
            .guest
            .send_raw(
                id,
                raw(
                    IOREQ_TYPE_PIO,
                    0x1_0000 + u64::from(i),
                    4,
                    1,
                    IOREQ_READ,
                    false,
                    false,
                    0,
                ),
            )
            .unwrap();
        assert_eq!(v, u64::MAX);
    }
    assert_eq!(r.ioreq.stats().bad.load(Ordering::Relaxed), 2000);
    assert!(r.ioreq.stats().suppressed_logs.load(Ordering::Relaxed) >= 1990);
}

// ---------------------------------------------------------------- XSA-180

/// A tracing subscriber that counts the bytes of every event as a formatter would print it.
struct CountingSubscriber {
    bytes: Arc<AtomicUsize>,
    lines: Arc<AtomicUsize>,
}

struct Fmt<'a>(&'a mut String);

impl tracing::field::Visit for Fmt<'_> {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, " {}={:?}", f.name(), v);
    }
}

impl tracing::Subscriber for CountingSubscriber {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut s = String::new();
        e.record(&mut Fmt(&mut s));
        // Timestamp, level and target as a formatter adds them.
        let line = 40 + e.metadata().target().len() + s.len();
        self.bytes.fetch_add(line, Ordering::Relaxed);
        self.lines.fetch_add(1, Ordering::Relaxed);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

struct NoForeign;

impl ForeignMemory for NoForeign {
    fn map(&self, domid: DomId, gfns: &[Gfn], _w: bool) -> Result<SharedMem, ForeignError> {
        Err(ForeignError::Frame {
            domid,
            gfn: gfns.first().copied().unwrap_or_default(),
            errno: libc_efault(),
        })
    }
    fn map_resource(
        &self,
        domid: DomId,
        _r: Resource,
        _f: u64,
        _n: u64,
    ) -> Result<SharedMem, ForeignError> {
        Err(ForeignError::Frame {
            domid,
            gfn: 0,
            errno: libc_efault(),
        })
    }
    fn restrict(&self, _d: DomId) -> Result<(), ForeignError> {
        Ok(())
    }
}

fn libc_efault() -> i32 {
    14
}

struct Nothing;

impl IoHandler for Nothing {
    fn read(&mut self, _a: IoAccess) -> Option<u64> {
        None
    }
    fn write(&mut self, _a: IoAccess, _v: u64) -> bool {
        false
    }
}

#[test]
fn xsa180_million_bad_ioreqs_log_bounded_and_suppressions_counted() {
    let bytes = Arc::new(AtomicUsize::new(0));
    let lines = Arc::new(AtomicUsize::new(0));
    let sub = CountingSubscriber {
        bytes: bytes.clone(),
        lines: lines.clone(),
    };
    let stats = Arc::new(IoreqStats::default());
    let mut d = Dispatcher::new(
        7,
        0,
        GuestMemory::new(Box::new(NoForeign), 7, 1 << 24),
        stats.clone(),
    );
    let mut h = Nothing;
    tracing::subscriber::with_default(sub, || {
        for i in 0..1_000_000u64 {
            // Alternate the kinds a guest can trigger: malformed, unclaimed, RAM failure.
            let req = match i % 3 {
                0 => raw(IOREQ_TYPE_PIO, 0x1_0000, 4, 1, IOREQ_READ, false, false, 0),
                1 => raw(IOREQ_TYPE_PIO, 0x300, 1, 1, IOREQ_WRITE, false, false, 0),
                _ => raw(
                    IOREQ_TYPE_PIO,
                    0x300,
                    1,
                    1,
                    IOREQ_WRITE,
                    true,
                    false,
                    0x1000,
                ),
            };
            d.handle(&req, &mut h);
        }
    });
    let logged = bytes.load(Ordering::Relaxed);
    assert!(logged <= 1 << 20, "{logged} bytes logged");
    assert!(
        lines.load(Ordering::Relaxed) >= 3,
        "each kind is logged at least once"
    );
    assert_eq!(stats.bad.load(Ordering::Relaxed), 333_334);
    let suppressed = stats.suppressed_logs.load(Ordering::Relaxed);
    let lines = lines.load(Ordering::Relaxed);
    assert_eq!(
        suppressed as usize + lines,
        1_000_000,
        "every line is logged or counted"
    );
    assert!(lines < 1000, "{lines} lines logged");
}

#[test]
fn test_device_panic_is_answered_and_server_goes_on() {
    let r = rig();
    r.dev.st().hook = Some(Box::new(|a: &IoAccess| {
        if a.addr == u64::from(SCRATCH_PORT) + 7 {
            panic!("device bug (expected by this test)");
        }
    }));
    assert_eq!(r.guest.pio_read(SCRATCH_PORT + 7, 1).unwrap(), 0xff);
    assert_eq!(r.ioreq.stats().handler_panics.load(Ordering::Relaxed), 1);
    r.guest.pio_write(SCRATCH_PORT, 1, 3).unwrap();
    assert_eq!(r.guest.pio_read(SCRATCH_PORT, 1).unwrap(), 3);
}

/// Waits up to 10 s for `cond`, checking every millisecond.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A request posted without its event (a notification lost between Xen and dom0) is still
/// served, by the sweep the ioreq thread makes after `SWEEP_INTERVAL` without events; an
/// answer the vCPU does not take is notified again at the next sweep. Without the sweep the
/// vCPU would wait for good (seen as silent hangs of HVM guests under nested TCG).
#[test]
fn test_request_without_event_is_served_by_the_sweep_and_renotified() {
    let r = rig();
    let page = ioreq_pages(&r);
    let stats = r.ioreq.stats();
    // Once a sweep has been made the thread is idle in poll (no polling after a sweep), so
    // the request below can only be found by the next sweep.
    r.guest.pio_write(SCRATCH_PORT, 1, 1).unwrap();
    let swept = stats.sweeps.load(Ordering::Relaxed);
    eventually("a sweep", || stats.sweeps.load(Ordering::Relaxed) > swept);
    // vCPU 1's slot (the rig's guest drives vCPU 0): a 1-byte write of 0x5a to port 0x101,
    // published READY with no notification.
    let slot = 4096 + 32;
    let mut req = raw(IOREQ_TYPE_PIO, 0x101, 1, 1, IOREQ_WRITE, false, false, 0x5a);
    let ready = req.bits;
    req.bits = Ioreq::make_bits(STATE_IOREQ_NONE, false, IOREQ_WRITE, false);
    page.write_obj(slot, &req).unwrap();
    page.store_u8(slot + 30, ready, Ordering::Release).unwrap();
    let state = |p: &xen::SharedMem| p.load_u8(slot + 30, Ordering::Acquire).unwrap() & 0x0f;
    eventually("the sweep to answer", || state(&page) == STATE_IORESP_READY);
    assert_eq!(stats.missed_events.load(Ordering::Relaxed), 1);
    assert!(r
        .dev
        .st()
        .accesses
        .iter()
        .any(|(a, w, v)| *w && a.addr == 0x101 && a.size == 1 && *v == 0x5a));
    // Not taken: the next sweep notifies vCPU 1's port again.
    eventually("a second notification", || {
        stats.renotified.load(Ordering::Relaxed) >= 1
    });
    assert_eq!(state(&page), STATE_IORESP_READY, "the answer is left alone");
    page.store_u8(slot + 30, STATE_IOREQ_NONE, Ordering::Release)
        .unwrap();
    // The rig's own vCPU still gets its answers through events.
    r.guest.pio_write(SCRATCH_PORT, 1, 7).unwrap();
    assert_eq!(r.guest.pio_read(SCRATCH_PORT, 1).unwrap(), 7);
    assert_eq!(stats.missed_events.load(Ordering::Relaxed), 1);
}
