//! virtio-blk through the whole machine: the guest OS library's driver negotiates, sets up
//! queues in guest RAM with MSI-X, and moves 64 MiB to raw and qcow2 images through the
//! storage engines; and the hostile-guest rows for virtqueues (XSA-211).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{config, DirectBus};
use xensim::guestos::blk::{Op, VirtioBlkDriver, T_DISCARD, T_IN, T_OUT, T_WRITE_ZEROES};
use xensim::guestos::pci::{self, BarWindow};
use xensim::guestos::virtio::{VirtioPciDev, S_NEEDS_RESET};
use xensim::guestos::RamAlloc;
use xensim::hvm::HvmBus;

const DATA: u64 = 1 << 20;
const MIB64: u64 = 64 << 20;

fn up(extra: &str, queues: u16, qsize: u16) -> (DirectBus, VirtioBlkDriver) {
    let bus = DirectBus::new(&config(extra));
    let mut fns = pci::enumerate(&bus).unwrap();
    pci::assign_bars(&bus, &mut fns, &mut BarWindow::default()).unwrap();
    let f = fns
        .iter()
        .find(|f| (f.vendor, f.device) == (0x1af4, 0x1042))
        .unwrap()
        .clone();
    let ram = RamAlloc::new(DATA + MIB64 + (1 << 20), bus.ram_size());
    let drv = VirtioBlkDriver::new(&bus, &f, &ram, 0x40, queues, qsize).unwrap();
    (bus, drv)
}

/// A pattern that differs in every 8 bytes and from run to run of `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn move_64mib(bus: &DirectBus, drv: &mut VirtioBlkDriver, seed: u64) {
    let data = pattern(seed, MIB64 as usize);
    bus.ram_write(DATA, &data).unwrap();
    let chunk = 1u64 << 20;
    let ops = |ty| -> Vec<Op> {
        (0..MIB64 / chunk)
            .map(|i| Op {
                ty,
                sector: i * chunk / 512,
                gpa: DATA + i * chunk,
                len: chunk as u32,
            })
            .collect()
    };
    let st = drv.run(bus, &ops(T_OUT), Duration::from_secs(120)).unwrap();
    assert!(st.iter().all(|s| *s == 0), "write statuses {st:?}");
    assert_eq!(drv.flush(bus).unwrap(), 0);
    bus.ram.fill(DATA as usize, MIB64 as usize, 0).unwrap();
    let st = drv.run(bus, &ops(T_IN), Duration::from_secs(120)).unwrap();
    assert!(st.iter().all(|s| *s == 0), "read statuses {st:?}");
    let mut back = vec![0u8; MIB64 as usize];
    bus.ram_read(DATA, &mut back).unwrap();
    assert!(
        back == data,
        "64 MiB read back differs from what was written"
    );
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img (Debian package qemu-utils) must be installed: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn virtio_blk_writes_and_reads_back_64mib_on_a_raw_image_over_4_queues() {
    let dir = tempfile::tempdir().unwrap();
    let img = common::raw_image(dir.path(), MIB64 + (1 << 20));
    let (bus, mut drv) = up(
        &format!(
            "virtio_queues = 4\ndisk = [ '{},raw,xvda,rw' ]",
            img.display()
        ),
        4,
        128,
    );
    assert_eq!(drv.queues.len(), 4);
    assert_eq!(drv.capacity, (MIB64 + (1 << 20)) / 512);
    move_64mib(&bus, &mut drv, 0x5eed);
    let file = std::fs::read(&img).unwrap();
    assert!(
        file[..MIB64 as usize] == pattern(0x5eed, MIB64 as usize)[..],
        "the image holds the guest's bytes"
    );
    // get-id gives the vdev; write-zeroes and discard clear what they cover.
    let (st, id) = drv.get_id(&bus, DATA).unwrap();
    assert_eq!((st, &id[..5]), (0, &b"xvda\0"[..]));
    let st = drv
        .run(
            &bus,
            &[
                Op {
                    ty: T_WRITE_ZEROES,
                    sector: 8,
                    gpa: 0,
                    len: 4096,
                },
                Op {
                    ty: T_DISCARD,
                    sector: 2048,
                    gpa: 0,
                    len: 1 << 20,
                },
            ],
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(st, vec![0, 0]);
    let file = std::fs::read(&img).unwrap();
    assert!(file[4096..8192].iter().all(|b| *b == 0));
    assert!(file[1 << 20..2 << 20].iter().all(|b| *b == 0));
    assert!(file[8192..8200] == pattern(0x5eed, 8200)[8192..]);
}

#[test]
fn virtio_blk_writes_and_reads_back_64mib_on_a_qcow2_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let (ok, out) = qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "65M"]);
    assert!(ok, "{out}");
    let (bus, mut drv) = up(
        &format!(
            "virtio_queues = 2\ndisk = [ '{},qcow2,xvda,rw' ]",
            img.display()
        ),
        2,
        128,
    );
    move_64mib(&bus, &mut drv, 0xfeed);
    // Reset the device (the engine is flushed and handed back), then check the image.
    drv.dev.reset(&bus).unwrap();
    let (ok, out) = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(ok, "qemu-img check: {out}");
    let raw = dir.path().join("want.raw");
    let mut want = pattern(0xfeed, MIB64 as usize);
    want.resize(65 << 20, 0);
    std::fs::write(&raw, &want).unwrap();
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert!(ok, "qemu-img compare: {out}");
}

/// Drives one queue by hand: descriptors written raw, heads pushed raw.
struct Raw<'a> {
    bus: &'a DirectBus,
    drv: &'a mut VirtioBlkDriver,
}

const HDR: u64 = 0x4_0000;
const STATUS: u64 = 0x4_1000;
const BUF: u64 = 0x4_2000;

/// Queues one 512-byte read of sector 0 (header at HDR, data at BUF, status at STATUS),
/// forgets the interrupts seen so far and notifies the device.
fn submit_one_read(bus: &DirectBus, q: &mut xensim::guestos::virtio::Virtqueue) {
    use xensim::guestos::virtio::Buf;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_IN.to_le_bytes());
    bus.ram_write(HDR, &h).unwrap();
    bus.take_irqs();
    q.add(
        bus,
        &[
            Buf {
                gpa: HDR,
                len: 16,
                write: false,
            },
            Buf {
                gpa: BUF,
                len: 512,
                write: true,
            },
            Buf {
                gpa: STATUS,
                len: 1,
                write: true,
            },
        ],
    )
    .unwrap();
    q.publish(bus).unwrap();
}
const NEXT: u16 = 1;
const WRITE: u16 = 2;

impl Raw<'_> {
    fn submit(&mut self, head: u16, descs: &[(u16, u64, u32, u16, u16)]) -> (u32, u32) {
        let q = &mut self.drv.queues[0];
        for &(i, gpa, len, flags, next) in descs {
            q.write_desc(self.bus, i, gpa, len, flags, next).unwrap();
        }
        self.bus.ram_write(STATUS, &[0xee]).unwrap();
        q.push_head(self.bus, head).unwrap();
        q.publish(self.bus).unwrap();
        for _ in 0..1000 {
            if let Some(u) = q.pop_used_raw(self.bus).unwrap() {
                return u;
            }
            self.bus.wait_irq(Duration::from_millis(100));
            self.bus.take_irqs();
        }
        panic!("no completion for head {head}");
    }
    fn status(&self) -> u8 {
        let mut s = [0u8];
        self.bus.ram_read(STATUS, &mut s).unwrap();
        s[0]
    }
    fn header(&self, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.bus.ram_write(HDR, &h).unwrap();
    }
    /// A good read of one sector: completes OK with 513 bytes written.
    fn good(&mut self) {
        self.header(T_IN, 0);
        let u = self.submit(
            0,
            &[
                (0, HDR, 16, NEXT, 1),
                (1, BUF, 512, NEXT | WRITE, 2),
                (2, STATUS, 1, WRITE, 0),
            ],
        );
        assert_eq!(u, (0, 513));
        assert_eq!(self.status(), 0);
    }
}

/// XSA-211: looping chains, addresses outside guest RAM, lengths 0, 64 KiB + 1 and
/// u32::MAX, sectors past the end: each request is answered (IOERR, or a used entry with
/// no status when the chain never ends) and the queue keeps serving good requests.
#[test]
fn xsa_211_bad_descriptor_chains_are_answered_and_the_queue_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = common::raw_image(dir.path(), 1 << 20);
    let (bus, mut drv) = up(&format!("disk = [ '{},raw,xvda,rw' ]", img.display()), 1, 8);
    let mut r = Raw {
        bus: &bus,
        drv: &mut drv,
    };
    r.good();
    // A loop: 0 -> 1 -> 0.
    r.header(T_IN, 0);
    assert_eq!(
        r.submit(0, &[(0, HDR, 16, NEXT, 1), (1, BUF, 512, NEXT | WRITE, 0)]),
        (0, 0)
    );
    r.good();
    // A next index past the table.
    assert_eq!(r.submit(0, &[(0, HDR, 16, NEXT, 200)]), (0, 0));
    r.good();
    let bad_data: [(u64, u32); 4] = [
        (0xffff_ffff_f000, 512),
        (BUF, 0),
        (BUF, 65537),
        (u64::MAX - 100, 512),
    ];
    for (gpa, len) in bad_data {
        r.header(T_IN, 0);
        let u = r.submit(
            0,
            &[
                (0, HDR, 16, NEXT, 1),
                (1, gpa, len, NEXT | WRITE, 2),
                (2, STATUS, 1, WRITE, 0),
            ],
        );
        assert_eq!((u, r.status()), ((0, 1), 1), "data {gpa:#x}+{len}");
        r.good();
    }
    // u32::MAX bytes of data make the chain longer than 2^32 bytes: it never ends as far as
    // the device is concerned, so it is returned unused and without a status.
    r.header(T_IN, 0);
    let u = r.submit(
        0,
        &[
            (0, HDR, 16, NEXT, 1),
            (1, BUF, u32::MAX, NEXT | WRITE, 2),
            (2, STATUS, 1, WRITE, 0),
        ],
    );
    assert_eq!((u, r.status()), ((0, 0), 0xee));
    r.good();
    // Past the end of the disk, a header outside RAM, a status outside RAM, an unknown type.
    r.header(T_IN, (1 << 20) / 512);
    assert_eq!(
        r.submit(
            0,
            &[
                (0, HDR, 16, NEXT, 1),
                (1, BUF, 512, NEXT | WRITE, 2),
                (2, STATUS, 1, WRITE, 0)
            ]
        ),
        (0, 1)
    );
    assert_eq!(r.status(), 1);
    assert_eq!(
        r.submit(
            0,
            &[
                (0, 1 << 40, 16, NEXT, 1),
                (1, BUF, 512, NEXT | WRITE, 2),
                (2, STATUS, 1, WRITE, 0)
            ]
        ),
        (0, 1)
    );
    assert_eq!(r.status(), 1);
    r.header(T_IN, 0);
    assert_eq!(
        r.submit(
            0,
            &[
                (0, HDR, 16, NEXT, 1),
                (1, BUF, 512, NEXT | WRITE, 2),
                (2, 1 << 40, 1, WRITE, 0)
            ]
        ),
        (0, 0)
    );
    r.header(99, 0);
    assert_eq!(
        r.submit(0, &[(0, HDR, 16, NEXT, 1), (1, STATUS, 1, WRITE, 0)]),
        (0, 1)
    );
    assert_eq!(r.status(), 2, "VIRTIO_BLK_S_UNSUPP");
    // A write whose data descriptor is device-writable (wrong direction).
    r.header(T_OUT, 0);
    assert_eq!(
        r.submit(
            0,
            &[
                (0, HDR, 16, NEXT, 1),
                (1, BUF, 512, NEXT | WRITE, 2),
                (2, STATUS, 1, WRITE, 0)
            ]
        ),
        (0, 1)
    );
    assert_eq!(r.status(), 1);
    r.good();
}

/// XSA-211: queue sizes that are zero, not a power of two or above the maximum are refused
/// at the write; rings outside guest RAM stop DRIVER_OK with DEVICE_NEEDS_RESET; after a reset
/// the device works.
#[test]
fn xsa_211_bad_queue_sizes_and_rings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = common::raw_image(dir.path(), 1 << 20);
    let bus = DirectBus::new(&config(&format!(
        "disk = [ '{},raw,xvda,rw' ]",
        img.display()
    )));
    let mut fns = pci::enumerate(&bus).unwrap();
    pci::assign_bars(&bus, &mut fns, &mut BarWindow::default()).unwrap();
    let f = fns[3].clone();
    let dev = VirtioPciDev::new(&bus, &f, 0x40).unwrap();
    dev.negotiate(&bus, 0).unwrap();
    let c = dev.common;
    bus.mmio_write(c + 0x16, 2, 0).unwrap();
    let max = bus.mmio_read(c + 0x18, 2).unwrap();
    for bad in [0u64, 3, 100, max * 2, 0xffff] {
        bus.mmio_write(c + 0x18, 2, bad).unwrap();
        assert_eq!(
            bus.mmio_read(c + 0x18, 2).unwrap(),
            max,
            "size {bad} refused"
        );
    }
    // Rings outside guest RAM.
    bus.mmio_write(c + 0x20, 8, 1 << 40).unwrap();
    bus.mmio_write(c + 0x28, 8, 0x1000).unwrap();
    bus.mmio_write(c + 0x30, 8, 0x2000).unwrap();
    bus.mmio_write(c + 0x1c, 2, 1).unwrap();
    dev.set_status(&bus, dev.status(&bus).unwrap() | 4).unwrap();
    assert_ne!(dev.status(&bus).unwrap() & S_NEEDS_RESET, 0);
    // A notify on the broken device and on a queue that does not exist go nowhere.
    bus.mmio_write(dev.notify, 2, 0).unwrap();
    bus.mmio_write(dev.notify + 4 * 500, 2, 500).unwrap();
    // After a reset, a proper driver brings it up and it serves I/O.
    let ram = RamAlloc::new(8 << 20, bus.ram_size());
    let mut drv = VirtioBlkDriver::new(&bus, &f, &ram, 0x40, 1, 16).unwrap();
    bus.ram_write(DATA, &[7u8; 4096]).unwrap();
    assert_eq!(drv.write(&bus, 0, DATA, 4096).unwrap(), 0);
    assert_eq!(std::fs::read(&img).unwrap()[..4096], [7u8; 4096]);
}

/// Without MSI-X the device interrupts on INTA# (XEN_DMOP_set_pci_intx_level) with the ISR
/// saying why; reading the ISR lowers the line. IOREQ_TYPE_INVALIDATE remaps guest RAM and
/// I/O goes on.
#[test]
fn intx_without_msix_and_invalidate_remaps_guest_ram() {
    use ioreq::IoHandler;
    use xensim::hvm::Irq;

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::write(&img, vec![0x5au8; 1 << 20]).unwrap();
    let bus = DirectBus::new(&config(&format!(
        "disk = [ '{},raw,xvda,rw' ]",
        img.display()
    )));
    let mut fns = pci::enumerate(&bus).unwrap();
    pci::assign_bars(&bus, &mut fns, &mut BarWindow::default()).unwrap();
    let f = fns[3].clone();
    let dev = VirtioPciDev::new(&bus, &f, 0).unwrap();
    dev.negotiate(&bus, 0).unwrap();
    let ram = RamAlloc::new(8 << 20, bus.ram_size());
    let mut q = dev.setup_queue(&bus, 0, 16, 0xffff, &ram).unwrap();
    dev.driver_ok(&bus).unwrap();
    bus.machine.lock().unwrap().invalidate();
    submit_one_read(&bus, &mut q);
    assert!(bus.wait_for(Duration::from_secs(10), |i| matches!(
        i,
        Irq::PciIntx {
            bus: 0,
            dev: 3,
            intx: 0,
            level: true
        }
    )));
    assert_eq!(
        bus.mmio_read(dev.isr, 1).unwrap(),
        1,
        "ISR: queue interrupt"
    );
    assert!(bus.wait_for(Duration::from_secs(1), |i| matches!(
        i,
        Irq::PciIntx { level: false, .. }
    )));
    assert_eq!(q.pop_used(&bus).unwrap().map(|u| u.1), Some(513));
    let mut b = [0u8; 512];
    bus.ram_read(BUF, &mut b).unwrap();
    assert_eq!(b, [0x5au8; 512]);
}

/// With MSI enabled and MSI-X off, completions arrive as the MSI message the guest
/// programmed (XEN_DMOP_inject_msi), not on INTx.
#[test]
fn msi_without_msix_delivers_the_programmed_message() {
    use xensim::hvm::Irq;

    let dir = tempfile::tempdir().unwrap();
    let img = common::raw_image(dir.path(), 1 << 20);
    let bus = DirectBus::new(&config(&format!(
        "disk = [ '{},raw,xvda,rw' ]",
        img.display()
    )));
    let mut fns = pci::enumerate(&bus).unwrap();
    pci::assign_bars(&bus, &mut fns, &mut BarWindow::default()).unwrap();
    let f = fns[3].clone();
    let mc = u16::from(f.cap(0x05).expect("an MSI capability"));
    assert_eq!(
        f.read(&bus, mc + 2, 2).unwrap() & 0x80,
        0x80,
        "64-bit capable"
    );
    f.write(&bus, mc + 4, 4, 0xfee0_1000).unwrap();
    f.write(&bus, mc + 8, 4, 0).unwrap();
    f.write(&bus, mc + 12, 2, 0x4321).unwrap();
    f.write(&bus, mc + 2, 2, 1).unwrap();
    let dev = VirtioPciDev::new(&bus, &f, 0).unwrap();
    dev.negotiate(&bus, 0).unwrap();
    let ram = RamAlloc::new(8 << 20, bus.ram_size());
    let mut q = dev.setup_queue(&bus, 0, 16, 0xffff, &ram).unwrap();
    dev.driver_ok(&bus).unwrap();
    submit_one_read(&bus, &mut q);
    assert!(bus.wait_for(Duration::from_secs(10), |i| *i
        == Irq::Msi {
            addr: 0xfee0_1000,
            data: 0x4321
        }));
    assert!(!bus
        .take_irqs()
        .iter()
        .any(|i| matches!(i, Irq::PciIntx { .. })));
}

/// XSA-211: a driver ring index far ahead of the device stalls that queue only; the other
/// queue of the disk keeps serving, and a reset brings the device back.
#[test]
fn xsa_211_runaway_driver_ring_index_stalls_only_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::write(&img, vec![0x33u8; 1 << 20]).unwrap();
    let (bus, mut drv) = up(
        &format!(
            "virtio_queues = 2\ndisk = [ '{},raw,xvda,rw' ]",
            img.display()
        ),
        2,
        8,
    );
    assert_eq!(drv.queues.len(), 2);
    let q1 = &drv.queues[1];
    bus.ram_write(q1.avail + 2, &1000u16.to_le_bytes()).unwrap();
    bus.mmio_write(drv.dev.notify + 4, 2, 1).unwrap();
    // Queue 0 still works (the same thread serves both queues, queue 1 first on this kick).
    let st = drv
        .run(
            &bus,
            &[Op {
                ty: T_IN,
                sector: 0,
                gpa: DATA,
                len: 4096,
            }],
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(st, vec![0]);
    let mut b = [0u8; 4096];
    bus.ram_read(DATA, &mut b).unwrap();
    assert_eq!(b, [0x33u8; 4096]);
    let mut used = [0u8; 2];
    bus.ram_read(drv.queues[1].used + 2, &mut used).unwrap();
    assert_eq!(
        u16::from_le_bytes(used),
        0,
        "nothing taken from the runaway queue"
    );
    // Reset and bring it up again.
    let f = drv.dev.pci.clone();
    let ram = RamAlloc::new(DATA + MIB64 + (8 << 20), bus.ram_size());
    let mut drv = VirtioBlkDriver::new(&bus, &f, &ram, 0x40, 2, 8).unwrap();
    let ops: Vec<Op> = (0..8)
        .map(|i| Op {
            ty: T_IN,
            sector: i * 8,
            gpa: DATA + i * 4096,
            len: 4096,
        })
        .collect();
    assert_eq!(
        drv.run(&bus, &ops, Duration::from_secs(10)).unwrap(),
        vec![0; 8]
    );
}

#[test]
fn xsa_139_repeated_unplug_writes_leave_the_disks_working() {
    // XSA-139: repeated or odd writes to the unplug port freed QEMU's emulated disks while
    // they were in use. domio has no emulated disks to free: the unplug protocol records the
    // mask, and the disks the guest uses (virtio-blk, PV) are unaffected by any number of
    // unplug writes, old-style BAR0 writes included.
    use xensim::guestos::platform::{self, Unplug};
    let dir = tempfile::tempdir().unwrap();
    let img = common::raw_image(dir.path(), 8 << 20);
    let (bus, mut drv) = up(
        &format!("disk = [ '{},raw,xvda,rw' ]", img.display()),
        1,
        64,
    );
    let one = |ty| {
        vec![Op {
            ty,
            sector: 8,
            gpa: DATA,
            len: 4096,
        }]
    };
    let data = pattern(0x139, 4096);
    bus.ram_write(DATA, &data).unwrap();
    let st = drv.run(&bus, &one(T_OUT), Duration::from_secs(30)).unwrap();
    assert_eq!(st, vec![0]);

    assert_eq!(
        platform::unplug(&bus, 1, 1, 0xffff).unwrap(),
        Unplug::Done { version: 1 }
    );
    for _ in 0..3 {
        bus.pio_write(0x10, 2, 0xffff).unwrap();
        bus.pio_write(0x10, 4, 0xffff_ffff).unwrap();
        bus.pio_write(0x11, 1, 0xff).unwrap();
    }
    // The platform device's BAR0 (old drivers write 1 at offset 4 to unplug).
    let fns = pci::enumerate(&bus).unwrap();
    let plat = fns
        .iter()
        .find(|f| (f.vendor, f.device) == (0x5853, 0x0001))
        .unwrap();
    let bar0 = pci::cfg_read(&bus, 0, plat.dev, 0, 0x10, 4).unwrap() & !0x3;
    for _ in 0..3 {
        bus.pio_write(bar0 as u16 + 4, 4, 1).unwrap();
    }

    bus.ram.fill(DATA as usize, 4096, 0).unwrap();
    let st = drv.run(&bus, &one(T_IN), Duration::from_secs(30)).unwrap();
    assert_eq!(st, vec![0], "the disk still answers after repeated unplugs");
    let mut back = vec![0u8; 4096];
    bus.ram_read(DATA, &mut back).unwrap();
    assert_eq!(back, data);
    let st = bus.machine.lock().unwrap().unplug_state().unwrap();
    assert_eq!(st.unplugged, 0xffff);
}

/// Waits for the next used entry of `q` (interrupts as the wakeup).
fn wait_used(bus: &DirectBus, q: &mut xensim::guestos::virtio::Virtqueue) -> (u16, u32) {
    for _ in 0..200 {
        if let Some(u) = q.pop_used(bus).unwrap() {
            return u;
        }
        bus.wait_irq(Duration::from_millis(50));
        bus.take_irqs();
    }
    panic!("no completion in 10 s");
}

/// One read, then a second queued right after its completion: returns the doorbells the
/// second one rang and skipped.
fn second_read_doorbells(poll_us: u32) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = common::raw_image(dir.path(), 1 << 20);
    let (bus, mut drv) = up(
        &format!(
            "virtio_poll_us = {poll_us}\ndisk = [ '{},raw,xvda,rw' ]",
            img.display()
        ),
        1,
        64,
    );
    let q = &mut drv.queues[0];
    submit_one_read(&bus, q);
    assert_eq!(wait_used(&bus, q).1, 513);
    let (rung, skipped) = q.doorbell_counts();
    submit_one_read(&bus, q);
    // Served either way: by the polling queue thread or through the doorbell.
    assert_eq!(wait_used(&bus, q).1, 513);
    let (rung2, skipped2) = q.doorbell_counts();
    (rung2 - rung, skipped2 - skipped)
}

#[test]
fn after_an_interrupt_the_queue_thread_polls_with_doorbells_off() {
    // A 100 ms window (the default is 200 µs) so that the test's own scheduling delays stay
    // well inside it: the request queued after the completion is picked up without a
    // doorbell (with EVENT_IDX, avail_event was left behind the driver's index).
    assert_eq!(second_read_doorbells(100_000), (0, 1));
    // Polling off: doorbells were re-armed when the ring drained, so the driver rings.
    assert_eq!(second_read_doorbells(0), (1, 0));
}
