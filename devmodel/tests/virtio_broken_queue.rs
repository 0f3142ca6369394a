//! Broken virtqueues (XSA-211, XSA-180): a driver that breaks a ring (index more than the
//! queue size ahead, a head outside the queue, a ring at guest-physical 0) gets its device
//! put in DEVICE_NEEDS_RESET with a configuration interrupt, the flag stays until a full
//! reset, 10^5 doorbells on the broken queue log a bounded number of lines (counted with a
//! subscriber of our own), and the other devices go on. Also: a tap deleted under a running
//! NIC does not hang the device reset.
//!
//! The tests of this file share one global subscriber and run one at a time.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::{config, in_netns, ip, DirectBus, LogCount};
use xensim::guestos::blk::{Op, VirtioBlkDriver, T_IN};
use xensim::guestos::pci::{self, BarWindow, PciFunction};
use xensim::guestos::virtio::{Buf, VirtioPciDev, S_NEEDS_RESET};
use xensim::guestos::RamAlloc;
use xensim::hvm::{HvmBus, Irq};

static LOG: OnceLock<LogCount> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

/// Installs the counting subscriber for the whole process (queue threads log too) and runs
/// the tests of this file one at a time.
fn counted() -> MutexGuard<'static, ()> {
    LOG.get_or_init(|| {
        let log = LogCount::default();
        tracing::subscriber::set_global_default(log.clone()).unwrap();
        // virtio-queue logs through the `log` crate; domio's binary bridges those records.
        tracing_log::LogTracer::init().unwrap();
        log
    });
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Events logged so far, any level and target: what a log would print.
fn logged() -> u64 {
    LOG.get()
        .map_or(0, |l| l.events.load(Ordering::SeqCst) as u64)
}

const DOORBELLS: u32 = 100_000;
/// Lines allowed for a flood: the limiters' bursts (50 each) and then 20 a second.
const MAX_LINES: u64 = 120;

fn functions(bus: &DirectBus) -> Vec<PciFunction> {
    let mut fns = pci::enumerate(bus).unwrap();
    pci::assign_bars(bus, &mut fns, &mut BarWindow::default()).unwrap();
    fns
}

/// Waits for the configuration-change MSI (vector 0 of a device whose vectors start at
/// `base`), then checks DEVICE_NEEDS_RESET.
fn needs_reset_signalled(bus: &DirectBus, dev: &VirtioPciDev, base: u32) -> bool {
    let msi = bus.wait_for(
        Duration::from_secs(10),
        |i| matches!(i, Irq::Msi { data, .. } if *data == base),
    );
    msi && dev.status(bus).unwrap() & S_NEEDS_RESET != 0
}

fn read4k(drv: &mut VirtioBlkDriver, bus: &DirectBus, gpa: u64) -> Vec<u8> {
    drv.run(
        bus,
        &[Op {
            ty: T_IN,
            sector: 0,
            gpa,
            len: 4096,
        }],
        Duration::from_secs(10),
    )
    .unwrap()
}

#[test]
fn broken_blk_queues_need_reset_log_boundedly_and_other_disks_go_on() {
    let _g = counted();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    std::fs::write(&a, vec![0xaau8; 1 << 20]).unwrap();
    std::fs::write(&b, vec![0xbbu8; 1 << 20]).unwrap();
    let bus = DirectBus::new(&config(&format!(
        "virtio_queues = 2\ndisk = [ '{},raw,xvda,rw', '{},raw,xvdb,rw' ]",
        a.display(),
        b.display()
    )));
    let fns = functions(&bus);
    let blk: Vec<_> = fns.iter().filter(|f| f.device == 0x1042).cloned().collect();
    assert_eq!(blk.len(), 2);
    let (ram_a, ram_b) = (
        RamAlloc::new(8 << 20, 16 << 20),
        RamAlloc::new(16 << 20, 24 << 20),
    );
    let (buf_a, buf_b) = (32 << 20, 40 << 20);
    let mut da = VirtioBlkDriver::new(&bus, &blk[0], &ram_a, 0x40, 2, 8).unwrap();
    let mut db = VirtioBlkDriver::new(&bus, &blk[1], &ram_b, 0x60, 1, 8).unwrap();
    assert_eq!(read4k(&mut da, &bus, buf_a), vec![0]);
    assert_eq!(read4k(&mut db, &bus, buf_b), vec![0]);

    // 1. The driver ring index of xvda's queue 1 runs away.
    bus.take_irqs();
    let before = logged();
    let q1 = &da.queues[1];
    bus.ram_write(q1.avail + 2, &1000u16.to_le_bytes()).unwrap();
    for _ in 0..DOORBELLS {
        bus.mmio_write(da.dev.notify + 4, 2, 1).unwrap();
    }
    assert!(needs_reset_signalled(&bus, &da.dev, 0x40));
    // The other disk goes on (and so does xvda's other queue).
    assert_eq!(read4k(&mut db, &bus, buf_b), vec![0]);
    assert_eq!(read4k(&mut da, &bus, buf_a), vec![0]);
    let lines = logged() - before;
    assert!(
        lines <= MAX_LINES,
        "{lines} log lines for {DOORBELLS} doorbells"
    );

    // NEEDS_RESET is sticky: status writes short of a reset do not clear it, nor does one
    // that tries to clear DRIVER_OK (ignored: the queue threads keep running).
    let s = da.dev.status(&bus).unwrap();
    da.dev.set_status(&bus, s & !S_NEEDS_RESET).unwrap();
    assert_eq!(da.dev.status(&bus).unwrap(), s);
    da.dev.set_status(&bus, 1 | 2 | 8).unwrap();
    assert_eq!(
        da.dev.status(&bus).unwrap(),
        s,
        "clearing DRIVER_OK is ignored"
    );
    assert_eq!(
        read4k(&mut da, &bus, buf_a),
        vec![0],
        "queue 0 still served"
    );

    // 2. A reset clears it and a proper driver works again.
    let mut da = VirtioBlkDriver::new(&bus, &blk[0], &ram_a, 0x40, 2, 8).unwrap();
    assert_eq!(da.dev.status(&bus).unwrap() & S_NEEDS_RESET, 0);
    assert_eq!(read4k(&mut da, &bus, buf_a), vec![0]);

    // 3. A head outside the queue: the ring is broken before virtio-queue sees it.
    bus.take_irqs();
    let before = logged();
    let q0 = &da.queues[0];
    let mut idx = [0u8; 2];
    bus.ram_read(q0.avail + 2, &mut idx).unwrap();
    let idx = u16::from_le_bytes(idx);
    let slot = q0.avail + 4 + 2 * u64::from(idx % q0.size);
    bus.ram_write(slot, &999u16.to_le_bytes()).unwrap();
    bus.ram_write(q0.avail + 2, &idx.wrapping_add(1).to_le_bytes())
        .unwrap();
    for _ in 0..DOORBELLS {
        bus.mmio_write(da.dev.notify, 2, 0).unwrap();
    }
    assert!(needs_reset_signalled(&bus, &da.dev, 0x40));
    assert_eq!(read4k(&mut db, &bus, buf_b), vec![0]);
    let lines = logged() - before;
    assert!(
        lines <= MAX_LINES,
        "{lines} log lines for {DOORBELLS} doorbells"
    );

    // 4. Rings at guest-physical 0 are refused at DRIVER_OK.
    for which in [0x20u64, 0x28, 0x30] {
        let dev = VirtioPciDev::new(&bus, &blk[0], 0x40).unwrap();
        dev.reset(&bus).unwrap();
        dev.negotiate(&bus, 0).unwrap();
        dev.enable_msix(&bus, 3).unwrap();
        dev.set_config_vector(&bus, 0).unwrap();
        let ram = RamAlloc::new(8 << 20, 16 << 20);
        let q = dev.setup_queue(&bus, 0, 8, 1, &ram).unwrap();
        let c = dev.common;
        bus.mmio_write(c + 0x16, 2, 0).unwrap();
        let _ = q;
        // Queue parameters can change until DRIVER_OK.
        bus.mmio_write(c + which, 8, 0).unwrap();
        bus.take_irqs();
        let before = logged();
        dev.set_status(&bus, dev.status(&bus).unwrap() | 4).unwrap();
        assert!(
            needs_reset_signalled(&bus, &dev, 0x40),
            "ring at {which:#x} = 0"
        );
        for _ in 0..1000 {
            bus.mmio_write(dev.notify, 2, 0).unwrap();
        }
        assert!(logged() - before <= MAX_LINES);
    }
    // A refused FEATURES_OK keeps NEEDS_RESET.
    let dev = VirtioPciDev::new(&bus, &blk[0], 0x40).unwrap();
    let s = dev.status(&bus).unwrap();
    assert_ne!(s & S_NEEDS_RESET, 0);
    assert_eq!(read4k(&mut db, &bus, buf_b), vec![0]);
    let mut da = VirtioBlkDriver::new(&bus, &blk[0], &ram_a, 0x40, 2, 8).unwrap();
    assert_eq!(read4k(&mut da, &bus, buf_a), vec![0]);
}

/// A refused FEATURES_OK does not clear a DEVICE_NEEDS_RESET set before it.
#[test]
fn refused_features_ok_keeps_needs_reset() {
    let _g = counted();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    let bus = DirectBus::new(&config(&format!(
        "disk = [ '{},raw,xvda,rw' ]",
        a.display()
    )));
    let fns = functions(&bus);
    let f = fns.iter().find(|f| f.device == 0x1042).unwrap();
    let dev = VirtioPciDev::new(&bus, f, 0x40).unwrap();
    dev.reset(&bus).unwrap();
    // DRIVER_OK without FEATURES_OK: NEEDS_RESET.
    dev.set_status(&bus, 1 | 2 | 4).unwrap();
    assert_ne!(dev.status(&bus).unwrap() & S_NEEDS_RESET, 0);
    // Features nobody offered, then FEATURES_OK: refused, and NEEDS_RESET stays.
    let c = dev.common;
    bus.mmio_write(c + 0x08, 4, 0).unwrap();
    bus.mmio_write(c + 0x0c, 4, 1 << 31).unwrap();
    dev.set_status(&bus, 1 | 2 | 4 | 8).unwrap();
    let s = dev.status(&bus).unwrap();
    assert_eq!(s & 8, 0, "FEATURES_OK refused");
    assert_ne!(s & S_NEEDS_RESET, 0, "NEEDS_RESET kept");
    dev.reset(&bus).unwrap();
    assert_eq!(dev.status(&bus).unwrap(), 0);
}

/// Resets `dev` on another thread (the reset joins the queue threads); true if it finished
/// within `timeout`.
fn reset_within(bus: &Arc<DirectBus>, dev: &VirtioPciDev, timeout: Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let (b, c) = (bus.clone(), dev.common);
    std::thread::spawn(move || {
        let _ = b.mmio_write(c + 0x14, 1, 0);
        let _ = tx.send(());
    });
    rx.recv_timeout(timeout).is_ok()
}

/// A virtio-net on tap `tap` with rx, tx and (with 2 pairs) the control queue set up by hand.
struct Nic {
    bus: Arc<DirectBus>,
    dev: VirtioPciDev,
    rx: xensim::guestos::virtio::Virtqueue,
    tx: xensim::guestos::virtio::Virtqueue,
    ctrl: xensim::guestos::virtio::Virtqueue,
    ram: RamAlloc,
}

fn nic(tap: &str) -> Nic {
    let bus = Arc::new(DirectBus::new(&config(&format!(
        "virtio_queues = 2\nvif = [ 'mac=00:16:3e:4d:00:09,vifname={tap}' ]"
    ))));
    ip(&["addr", "add", "10.78.0.1/24", "dev", tap]);
    ip(&["link", "set", tap, "up"]);
    let fns = functions(&bus);
    let f = fns.iter().find(|f| f.device == 0x1041).unwrap().clone();
    let dev = VirtioPciDev::new(bus.as_ref(), &f, 0x80).unwrap();
    dev.negotiate(bus.as_ref(), (1 << 17) | (1 << 22)).unwrap();
    dev.enable_msix(bus.as_ref(), 6).unwrap();
    dev.set_config_vector(bus.as_ref(), 0).unwrap();
    let ram = RamAlloc::new(8 << 20, 24 << 20);
    let b = bus.as_ref();
    let mut rx = dev.setup_queue(b, 0, 16, 1, &ram).unwrap();
    let tx = dev.setup_queue(b, 1, 16, 2, &ram).unwrap();
    let ctrl = dev.setup_queue(b, 4, 16, 5, &ram).unwrap();
    dev.driver_ok(b).unwrap();
    assert_eq!(dev.status(b).unwrap() & S_NEEDS_RESET, 0);
    for _ in 0..8 {
        let buf = ram.alloc(2048, 64).unwrap();
        rx.add(
            b,
            &[Buf {
                gpa: buf,
                len: 2048,
                write: true,
            }],
        )
        .unwrap();
    }
    rx.publish(b).unwrap();
    Nic {
        bus,
        dev,
        rx,
        tx,
        ctrl,
        ram,
    }
}

/// Makes Linux send a frame into the tap (an ARP request for a neighbour).
fn provoke_frame() {
    let s = std::net::UdpSocket::bind("10.78.0.1:0").unwrap();
    let _ = s.send_to(b"x", "10.78.0.2:9");
}

#[test]
fn broken_net_queues_need_reset_and_log_boundedly() {
    let _g = counted();
    in_netns(|| {
        // TX and control: the ring index runs away; RX: a head outside the queue, found
        // when a frame arrives.
        // A tap of its own each time: the last machine may still be going away.
        for (which, tap) in [("tx", "dmtapb0"), ("ctrl", "dmtapb1"), ("rx", "dmtapb2")] {
            let n = nic(tap);
            let b = n.bus.as_ref();
            b.take_irqs();
            let before = logged();
            let (q, notify) = match which {
                "tx" => (&n.tx, n.dev.notify + 4),
                "ctrl" => (&n.ctrl, n.dev.notify + 16),
                _ => (&n.rx, n.dev.notify),
            };
            if which == "rx" {
                let mut idx = [0u8; 2];
                b.ram_read(q.avail + 2, &mut idx).unwrap();
                let idx = u16::from_le_bytes(idx);
                let slot = q.avail + 4 + 2 * u64::from(idx % q.size);
                // Post one more buffer whose head is outside the queue.
                b.ram_write(slot, &500u16.to_le_bytes()).unwrap();
                b.ram_write(q.avail + 2, &idx.wrapping_add(1).to_le_bytes())
                    .unwrap();
                // Use up the good buffers and reach the bad one.
                for _ in 0..9 {
                    provoke_frame();
                }
            } else {
                b.ram_write(q.avail + 2, &1000u16.to_le_bytes()).unwrap();
            }
            for _ in 0..DOORBELLS {
                b.mmio_write(notify, 2, 0).unwrap();
            }
            if which == "rx" {
                // Keep frames coming until the bad head is reached.
                let deadline = Instant::now() + Duration::from_secs(10);
                while n.dev.status(b).unwrap() & S_NEEDS_RESET == 0 && Instant::now() < deadline {
                    provoke_frame();
                    b.wait_irq(Duration::from_millis(50));
                }
            }
            assert!(
                needs_reset_signalled(b, &n.dev, 0x80),
                "{which}: NEEDS_RESET with a config interrupt"
            );
            let lines = logged() - before;
            assert!(lines <= MAX_LINES, "{which}: {lines} lines");
            assert!(reset_within(&n.bus, &n.dev, Duration::from_secs(10)));
            let _ = &n.ram;
            drop(n);
        }
    });
}

/// A tap deleted under a running NIC: the queue thread sees its engine fail (EBADFD), stops
/// polling it, and sets NEEDS_RESET; the device reset (which joins the thread) finishes.
#[test]
fn deleting_the_tap_under_a_running_nic_does_not_hang_the_reset() {
    let _g = counted();
    in_netns(|| {
        let n = nic("dmtapd0");
        let b = n.bus.as_ref();
        provoke_frame();
        b.take_irqs();
        let before = logged();
        ip(&["link", "del", "dmtapd0"]);
        assert!(
            needs_reset_signalled(b, &n.dev, 0x80),
            "engine failure sets NEEDS_RESET"
        );
        // Doorbells on the dead NIC: answered, bounded logging.
        for _ in 0..DOORBELLS {
            b.mmio_write(n.dev.notify, 2, 0).unwrap();
        }
        assert!(
            reset_within(&n.bus, &n.dev, Duration::from_secs(10)),
            "device reset hangs"
        );
        let lines = logged() - before;
        assert!(lines <= MAX_LINES, "{lines} lines");
        assert_eq!(n.dev.status(b).unwrap(), 0);
    });
}

/// Names of this process's threads that start with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with(prefix))
        .count()
}

/// A driver whose DRIVER_OK got DEVICE_NEEDS_RESET (a descriptor table at guest-physical 0),
/// then repairs the ring and writes DRIVER_OK again without resetting, gets nothing started:
/// the device stays down, with no queue thread, until a full reset (so a partial activation
/// cannot be repeated into a pile of threads either). After the reset it works.
#[test]
fn driver_ok_after_needs_reset_starts_nothing_until_reset() {
    let _g = counted();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    std::fs::write(&img, vec![0x5au8; 1 << 20]).unwrap();
    let bus = DirectBus::new(&config(&format!(
        "disk = [ '{},raw,xvdq,rw' ]",
        img.display()
    )));
    let fns = functions(&bus);
    let f = fns.iter().find(|f| f.device == 0x1042).unwrap().clone();
    let dev = VirtioPciDev::new(&bus, &f, 0x40).unwrap();
    dev.negotiate(&bus, 0).unwrap();
    dev.enable_msix(&bus, 2).unwrap();
    dev.set_config_vector(&bus, 0).unwrap();
    let ram = RamAlloc::new(8 << 20, 24 << 20);
    let q = dev.setup_queue(&bus, 0, 8, 1, &ram).unwrap();
    bus.mmio_write(dev.common + 0x16, 2, 0).unwrap();
    bus.mmio_write(dev.common + 0x20, 8, 0).unwrap();
    assert!(dev.driver_ok(&bus).is_err(), "a ring at 0 is refused");
    assert!(needs_reset_signalled(&bus, &dev, 0x40));

    // The ring repaired, DRIVER_OK again (the same status value), several times.
    bus.mmio_write(dev.common + 0x20, 8, q.desc).unwrap();
    for _ in 0..20 {
        dev.set_status(&bus, 0x0f).unwrap();
    }
    assert_eq!(threads_named("vblk-xvdq"), 0, "a queue thread was started");
    assert_ne!(dev.status(&bus).unwrap() & S_NEEDS_RESET, 0);

    // A full reset brings it back.
    let mut drv = VirtioBlkDriver::new(&bus, &f, &ram, 0x40, 1, 8).unwrap();
    let buf = ram.alloc(4096, 4096).unwrap();
    assert_eq!(read4k(&mut drv, &bus, buf), vec![0], "read status");
    let mut got = vec![0u8; 4096];
    bus.ram_read(buf, &mut got).unwrap();
    assert_eq!(got, vec![0x5au8; 4096]);
    assert_eq!(threads_named("vblk-xvdq"), 1);
}

#[test]
fn rings_ending_exactly_at_the_end_of_ram_are_refused_with_a_bounded_log() {
    // virtio-queue takes a ring's end address as an address that must be in guest memory, so
    // it refuses a ring that ends exactly where RAM ends, and logs an error of its own each
    // time, with no rate limit. Our check refuses it first, rate-limited: a driver repeating
    // reset and DRIVER_OK with such a ring must not flood the log (XSA-180).
    let _g = counted();
    let dir = tempfile::tempdir().unwrap();
    let img = common::raw_image(dir.path(), 1 << 20);
    let bus = DirectBus::new(&config(&format!(
        "disk = [ '{},raw,xvda,rw' ]",
        img.display()
    )));
    let f = functions(&bus)
        .into_iter()
        .find(|f| f.device == 0x1042)
        .unwrap();
    let dev = VirtioPciDev::new(&bus, &f, 0x40).unwrap();
    let c = dev.common;
    let n = 16u64;
    let end = bus.ram_size();
    let before = logged();
    for _ in 0..2_000 {
        dev.reset(&bus).unwrap();
        dev.negotiate(&bus, 0).unwrap();
        bus.mmio_write(c + 0x16, 2, 0).unwrap();
        bus.mmio_write(c + 0x18, 2, n).unwrap();
        bus.mmio_write(c + 0x20, 8, end - 16 * n).unwrap(); // descriptor table: last bytes of RAM
        bus.mmio_write(c + 0x28, 8, 0x1000).unwrap();
        bus.mmio_write(c + 0x30, 8, 0x2000).unwrap();
        bus.mmio_write(c + 0x1c, 2, 1).unwrap();
        dev.set_status(&bus, dev.status(&bus).unwrap() | 4).unwrap();
        assert_ne!(dev.status(&bus).unwrap() & S_NEEDS_RESET, 0);
    }
    let lines = logged() - before;
    assert!(lines <= MAX_LINES, "{lines} log lines for 2000 refusals");
    // A proper driver still brings the disk up.
    let ram = RamAlloc::new(8 << 20, bus.ram_size());
    let mut drv = VirtioBlkDriver::new(&bus, &f, &ram, 0x40, 1, 16).unwrap();
    assert_eq!(read4k(&mut drv, &bus, 0x10_0000), vec![0]);
}
