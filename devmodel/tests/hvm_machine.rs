//! The machine driven by the guest OS library over a direct bus: PCI enumeration, the
//! platform device's unplug handshake, the UART's consoles and interrupt, and the hostile
//! configuration-space and BAR rows of THREATS.md §5.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{config, DirectBus, LogCount};
use ioreq::Sbdf;
use xen::IoRange;
use xensim::guestos::pci::{self, BarWindow};
use xensim::guestos::platform::{self, Unplug};
use xensim::guestos::uart::Uart;
use xensim::hvm::{HvmBus, Irq};

fn disk(dir: &tempfile::TempDir, name: &str, mib: u64) -> String {
    let p = dir.path().join(name);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn enumerate_bus_ids_bars_and_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(&dir, "a.img", 8);
    let bus = DirectBus::new(&config(&format!("disk = [ '{d},raw,xvda,rw' ]")));
    let mut fns = pci::enumerate(&bus).unwrap();
    let ids: Vec<(u8, u16, u16, u32)> = fns
        .iter()
        .map(|f| (f.dev, f.vendor, f.device, f.class))
        .collect();
    assert_eq!(
        ids,
        vec![
            (0, 0x8086, 0x1237, 0x060000),
            (1, 0x8086, 0x7000, 0x060100),
            (2, 0x5853, 0x0001, 0xff8000),
            (3, 0x1af4, 0x1042, 0x018000)
        ]
    );
    // Platform: BAR0 I/O 256 bytes, BAR1 16 MiB prefetchable memory.
    let p = &fns[2];
    let b0 = p.bars[0].unwrap();
    let b1 = p.bars[1].unwrap();
    assert!(b0.io && b0.size == 256);
    assert!(!b1.io && b1.prefetchable && b1.size == 16 << 20);
    // virtio-blk: one 32 KiB memory BAR, four virtio vendor caps, MSI, then MSI-X.
    let v = &fns[3];
    assert_eq!(v.bars[0].map(|b| (b.io, b.size)), Some((false, 0x8000)));
    let cap_ids: Vec<u8> = v.caps.iter().map(|c| c.id).collect();
    assert_eq!(cap_ids, vec![0x09, 0x09, 0x09, 0x09, 0x05, 0x11]);
    // The PIIX3 is multi-function-capable and its PIRQ routes start disabled.
    assert_eq!(fns[1].header_type & 0x80, 0x80);
    assert_eq!(fns[1].read(&bus, 0x60, 4).unwrap(), 0x8080_8080);
    // Nothing is routed before assignment; everything after.
    assert!(bus.machine.lock().unwrap().routed_bars().is_empty());
    pci::assign_bars(&bus, &mut fns, &mut BarWindow::default()).unwrap();
    let routed = bus.machine.lock().unwrap().routed_bars();
    assert_eq!(routed.len(), 3, "{routed:?}");
    assert!(routed.contains(&IoRange::Port {
        start: 0xc000,
        end: 0xc0ff
    }));
    // Reading the BAR back gives the address with the type bits.
    assert_eq!(
        fns[3].read(&bus, 0x10, 4).unwrap(),
        fns[3].bars[0].unwrap().addr as u32
    );
    // An absent device reads all ones.
    assert_eq!(pci::cfg_read(&bus, 0, 9, 0, 0, 4).unwrap(), 0xffff_ffff);
}

#[test]
fn unplug_handshake_and_blacklist() {
    let bus = DirectBus::new(&config(""));
    assert_eq!(
        platform::unplug(&bus, 3, 0x1234, 0x3).unwrap(),
        Unplug::Done { version: 1 }
    );
    platform::log(&bus, "hello from the PV drivers").unwrap();
    let st = bus.machine.lock().unwrap().unplug_state().unwrap();
    assert_eq!(
        (
            st.product,
            st.build,
            st.unplugged,
            st.blacklisted,
            st.log_lines
        ),
        (Some(3), Some(0x1234), 3, false, 1)
    );

    let bus = DirectBus::new(&config("xen_platform_blacklist = [ 1 ]"));
    assert_eq!(
        platform::unplug(&bus, 1, 7, 0x3).unwrap(),
        Unplug::Blacklisted
    );
    assert_eq!(bus.pio_read(0x10, 2).unwrap(), 0xd249);
    let st = bus.machine.lock().unwrap().unplug_state().unwrap();
    assert_eq!(
        st.unplugged, 0,
        "blacklisted drivers stop before unplugging"
    );
}

fn uart_input_raises_irq4(bus: &DirectBus, mut feed: impl FnMut(&[u8])) {
    let u = Uart::COM1;
    u.init(bus).unwrap();
    bus.take_irqs();
    feed(b"ping\n");
    let mut got = Vec::new();
    let n = u
        .read_irq(bus, &mut got, 5, Duration::from_secs(10))
        .unwrap();
    assert_eq!(got, b"ping\n");
    assert!(n >= 1);
}

#[test]
fn uart_bytes_reach_the_pty_and_input_raises_irq4() {
    let bus = DirectBus::new(&config("serial = 'pty'"));
    let console = bus
        .machine
        .lock()
        .unwrap()
        .serial_console()
        .unwrap()
        .to_string();
    let path = console.strip_prefix("pty:").unwrap().to_string();
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let u = Uart::COM1;
    u.init(&bus).unwrap();
    u.write(&bus, b"hello, pty\n").unwrap();
    let mut buf = [0u8; 11];
    pty.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello, pty\n");
    let mut w = pty.try_clone().unwrap();
    uart_input_raises_irq4(&bus, |d| w.write_all(d).unwrap());
}

#[test]
fn uart_bytes_reach_the_unix_socket_and_input_raises_irq4() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("com1.sock");
    let bus = DirectBus::new(&config(&format!(
        "serial = 'unix:{},server'",
        sock.display()
    )));
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let u = Uart::COM1;
    u.init(&bus).unwrap();
    // The listener accepts on its own thread; output before that is dropped, so send until
    // the first byte arrives.
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut first = [0u8; 1];
    let mut ok = false;
    for _ in 0..100 {
        u.write(&bus, b"!").unwrap();
        if c.read(&mut first).is_ok_and(|n| n == 1) {
            ok = true;
            break;
        }
    }
    assert!(ok, "the socket client never got a byte");
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut sink = [0u8; 256];
    while c.read(&mut sink).is_ok_and(|n| n > 0) {}
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.write(&bus, b"over the socket\n").unwrap();
    let mut buf = [0u8; 16];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"over the socket\n");
    let mut w = c.try_clone().unwrap();
    uart_input_raises_irq4(&bus, |d| w.write_all(d).unwrap());
}

#[test]
fn uart_bytes_reach_the_log_file_and_loopback_echoes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("com1.log");
    let bus = DirectBus::new(&config(&format!("serial = 'file:{}'", log.display())));
    let u = Uart::COM1;
    u.init(&bus).unwrap();
    u.write(&bus, b"to the file\n").unwrap();
    assert_eq!(std::fs::read(&log).unwrap(), b"to the file\n");
    // Loopback: THR comes back on RBR and raises the received-data interrupt.
    bus.take_irqs();
    bus.pio_write(0x3fc, 1, 0x1b).unwrap();
    bus.pio_write(0x3f8, 1, u32::from(b'x')).unwrap();
    assert!(bus.wait_for(Duration::from_secs(1), |i| matches!(
        i,
        Irq::Isa {
            irq: 4,
            level: true
        }
    )));
    // FIFO trigger level 1 (FCR 0x07): a single byte is "received data available".
    assert_eq!(bus.pio_read(0x3fa, 1).unwrap() & 0x0f, 0x04);
    assert_eq!(bus.pio_read(0x3f8, 1).unwrap(), u32::from(b'x'));
    assert_eq!(bus.pio_read(0x3fd, 1).unwrap() & 1, 0);
    // MSR in loopback mirrors MCR: RTS->CTS, DTR->DSR, OUT2->DCD.
    assert_eq!(bus.pio_read(0x3fe, 1).unwrap() & 0xf0, 0xb0);
    assert_eq!(
        std::fs::read(&log).unwrap(),
        b"to the file\n",
        "loopback bytes stay inside the UART"
    );
}

/// A `file:` console holds at most its cap (what was in the file counts); the rest is dropped
/// and counted, so a guest writing without end cannot fill dom0's disk.
#[test]
fn uart_file_console_is_capped_and_the_rest_is_counted() {
    use devmodel::irq::IrqSink;
    use devmodel::uart::{SerialSpec, Uart as DevUart, COM1_IRQ};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("com1.log");
    std::fs::write(&log, b"old\n").unwrap();
    let irq = IrqSink::new(
        std::sync::Arc::new(common::RecordingDm(Default::default())),
        common::DOMID,
    );
    let spec = SerialSpec::File(log.display().to_string());
    let mut u = DevUart::with_file_cap(&spec, irq, COM1_IRQ, 1000).unwrap();
    for i in 0..5000u32 {
        u.write(0, b'a' + (i % 26) as u8);
    }
    let got = std::fs::read(&log).unwrap();
    assert_eq!(got.len(), 1000);
    assert_eq!(&got[..4], b"old\n");
    assert_eq!(got[4], b'a');
    assert_eq!(u.tx_dropped(), 5000 - 996);
    // The default cap is 16 MiB.
    assert_eq!(devmodel::uart::FILE_CAP_DEFAULT, 16 << 20);
}

/// XSA-238: a guest writing all ones to every BAR (the sizing probe, left in place) and then
/// enabling decoding gets no range routed; overlapping BARs are refused too.
#[test]
fn xsa_238_all_ones_bars_and_overlaps_are_never_routed() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (disk(&dir, "a.img", 1), disk(&dir, "b.img", 1));
    let bus = DirectBus::new(&config(&format!(
        "disk = [ '{a},raw,xvda', '{b},raw,xvdb' ]"
    )));
    let mut fns = pci::enumerate(&bus).unwrap();
    for f in &fns {
        for off in (0x10..0x28).step_by(4) {
            f.write(&bus, off, 4, 0xffff_ffff).unwrap();
        }
        f.write(&bus, 4, 2, 0x7).unwrap();
    }
    assert!(bus.machine.lock().unwrap().routed_bars().is_empty());
    // BAR0 of 00:03.0 overlapping BAR0 of 00:04.0: only the first is routed.
    pci::assign_bars(&bus, &mut fns, &mut BarWindow::default()).unwrap();
    let before = bus.machine.lock().unwrap().routed_bars();
    let a0 = fns[3].bars[0].unwrap().addr as u32;
    fns[4].write(&bus, 0x10, 4, a0).unwrap();
    let after = bus.machine.lock().unwrap().routed_bars();
    assert_eq!(after.len(), before.len() - 1, "{after:?}");
    // A BAR at 0 (unassigned) is not routed either, and the guest goes on.
    fns[4].write(&bus, 0x10, 4, 0).unwrap();
    assert_eq!(
        bus.machine.lock().unwrap().routed_bars().len(),
        before.len() - 1
    );
    // Every range that was registered is one the registry accepted (end >= start).
    assert!(bus.ranges.0.lock().unwrap().iter().all(|r| match *r {
        IoRange::Port { start, end } | IoRange::Mmio { start, end } => start <= end,
        IoRange::Pci { .. } => true,
    }));
}

/// XSA-126/131/120: per-register write masks; accesses that straddle registers, leave the
/// 256-byte header or reach 4096 are answered (all ones / ignored) and change nothing.
#[test]
fn xsa_126_131_120_config_masks_and_straddling_accesses() {
    let dir = tempfile::tempdir().unwrap();
    let a = disk(&dir, "a.img", 1);
    let bus = DirectBus::new(&config(&format!("disk = [ '{a},raw,xvda' ]")));
    let sbdf = Sbdf {
        seg: 0,
        bus: 0,
        dev: 3,
        func: 0,
    };
    let snapshot = |bus: &DirectBus| {
        (0..64)
            .map(|i| bus.cfg_raw_read(sbdf, i * 4, 4).unwrap())
            .collect::<Vec<_>>()
    };
    let before = snapshot(&bus);
    // Read-only registers: ids, class, header type, capability pointer, status cap bit.
    for (off, size) in [
        (0u64, 4u8),
        (8, 4),
        (0x0e, 1),
        (0x34, 1),
        (0x2c, 4),
        (0x3d, 1),
    ] {
        assert!(bus.cfg_raw_write(sbdf, off, size, 0));
    }
    assert!(bus.cfg_raw_write(sbdf, 6, 2, 0xffff));
    // Straddling BAR0 and BAR1; at 0xff size 4; at 0x1000; at 0xffe size 4.
    assert!(bus.cfg_raw_write(sbdf, 0x12, 4, 0xdead_beef));
    assert!(bus.cfg_raw_write(sbdf, 0xff, 4, 0xdead_beef));
    assert!(bus.cfg_raw_write(sbdf, 0x1000, 4, 0xdead_beef));
    assert!(bus.cfg_raw_write(sbdf, 0xffe, 4, 0xdead_beef));
    assert_eq!(bus.cfg_raw_read(sbdf, 0x12, 4), Some(0xffff_ffff));
    assert_eq!(bus.cfg_raw_read(sbdf, 0xff, 4), Some(0xffff_ffff));
    assert_eq!(bus.cfg_raw_read(sbdf, 0x1000, 4), Some(0xffff_ffff));
    // Extended space reads as zero (no extended capabilities).
    assert_eq!(bus.cfg_raw_read(sbdf, 0x100, 4), Some(0));
    assert_eq!(snapshot(&bus), before, "nothing changed");
    // The MSI-X capability's table offset and size are read-only; only enable/mask move.
    let f = pci::enumerate(&bus).unwrap().remove(3);
    let mc = u64::from(f.cap(0x11).unwrap());
    let tbl = bus.cfg_raw_read(sbdf, mc + 4, 4).unwrap();
    assert!(bus.cfg_raw_write(sbdf, mc + 4, 4, 0));
    assert!(bus.cfg_raw_write(sbdf, mc + 2, 2, 0xffff));
    assert_eq!(bus.cfg_raw_read(sbdf, mc + 4, 4).unwrap(), tbl);
    assert_eq!(
        bus.cfg_raw_read(sbdf, mc + 2, 2).unwrap() & 0x3fff,
        1,
        "table size stays 2 vectors"
    );
    // The machine still answers normally.
    assert_eq!(bus.cfg_raw_read(sbdf, 0, 4), Some(0x1042_1af4));
}

/// XSA-180: a guest hammering paths that log (refused config accesses, unknown platform
/// ports, unplug requests, the PV driver log port, BAR moves) gets a bounded number of log
/// lines, and the suppression is reported.
#[test]
fn xsa_180_guest_triggered_device_logs_are_rate_limited() {
    use std::sync::atomic::Ordering::Relaxed;
    let count = LogCount::default();
    let c = count.clone();
    let c_note = count.suppressed_note.clone();
    let t = std::time::Instant::now();
    tracing::subscriber::with_default(c, || {
        let bus = DirectBus::new(&config(""));
        let sbdf = Sbdf {
            seg: 0,
            bus: 0,
            dev: 2,
            func: 0,
        };
        for i in 0..100_000u64 {
            bus.cfg_raw_write(sbdf, 0x11 + (i % 2), 4, i);
            bus.pio_write(0x11, 1, 0).unwrap();
            if i % 10 == 0 {
                bus.pio_write(0x10, 2, 3).unwrap();
                bus.cfg_raw_write(sbdf, 0x14, 4, 0xffff_ffff);
                bus.cfg_raw_write(sbdf, 0x04, 2, 3);
            }
        }
        for _ in 0..2_000 {
            platform::log(&bus, &"x".repeat(300)).unwrap();
        }
        // The count of suppressed lines goes out with the next line the bucket admits, one
        // token (50 ms at 20 lines a second) after the burst ran dry; an optimised build can
        // finish the loops above sooner than that, so go on hammering until it does (bounded).
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !c_note.load(Relaxed) && std::time::Instant::now() < until {
            bus.pio_write(0x11, 1, 0).unwrap();
            std::hint::spin_loop();
        }
    });
    let secs = t.elapsed().as_secs_f64().ceil();
    let (events, bytes) = (count.events.load(Relaxed), count.bytes.load(Relaxed));
    // Three limiters are involved (bus, platform device, ISA bridge), each 50 lines of burst
    // and 20 a second, plus the device lines logged once at start.
    let bound = 3.0 * (50.0 + 20.0 * secs) + 16.0;
    assert!(
        (events as f64) <= bound,
        "{events} log lines in {secs} s (bound {bound})"
    );
    assert!(bytes <= 1 << 20, "{bytes} bytes of log");
    assert!(
        count.suppressed_note.load(Relaxed),
        "the suppression count is reported"
    );
}

/// A minimal bzImage (boot protocol 2.15, loaded high, 4 setup sectors) and a valid ROM.
fn boot_files(dir: &tempfile::TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut k = vec![0u8; 5 * 512 + 8192];
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    k[0x211] = 0x01;
    k[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    k[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    let mut rom = vec![0u8; 512];
    rom[..3].copy_from_slice(&[0x55, 0xaa, 1]);
    rom[511] = 0u8.wrapping_sub(rom.iter().fold(0u8, |a, b| a.wrapping_add(*b)));
    let (kp, rp) = (dir.path().join("vmlinuz"), dir.path().join("linuxboot.bin"));
    std::fs::write(&kp, k).unwrap();
    std::fs::write(&rp, rom).unwrap();
    (kp, rp)
}

#[test]
fn chipset_ports_hvmloader_seabios_and_linux_need() {
    // Arrange: a machine with a direct kernel boot.
    let dir = tempfile::tempdir().unwrap();
    let (kernel, rom) = boot_files(&dir);
    let mut cfg = config("");
    cfg.kernel = Some(devmodel::config::KernelBoot {
        kernel,
        initrd: None,
        cmdline: "console=ttyS0".into(),
        rom,
    });
    let bus = DirectBus::new(&cfg);
    let ranges = bus.ranges.0.lock().unwrap().clone();

    // Act + Assert: fw_cfg as SeaBIOS reads it.
    bus.pio_write(0x510, 2, 0).unwrap();
    let sig: Vec<u8> = (0..4)
        .map(|_| bus.pio_read(0x511, 1).unwrap() as u8)
        .collect();
    assert_eq!(sig, b"QEMU");
    bus.pio_write(0x510, 2, 0x15).unwrap(); // CMDLINE_DATA
    let cmd: Vec<u8> = (0..14)
        .map(|_| bus.pio_read(0x511, 1).unwrap() as u8)
        .collect();
    assert_eq!(cmd, b"console=ttyS0\0");
    // CMOS above the RTC: RAM above 4 GiB reads 0, hvmloader's writes stick.
    bus.pio_write(0x70, 1, 0x5b).unwrap();
    assert_eq!(bus.pio_read(0x71, 1).unwrap(), 0);
    bus.pio_write(0x70, 1, 0x34).unwrap();
    bus.pio_write(0x71, 1, 0x7f).unwrap();
    assert_eq!(bus.pio_read(0x71, 1).unwrap(), 0x7f);
    // ACPI: SCI enabled, GPE0 reads 0, and the DSDT's _S5 (SLP_TYP 0 with SLP_EN) shuts
    // the domain down for poweroff.
    assert_eq!(bus.pio_read(0xb004, 2).unwrap() & 1, 1);
    assert_eq!(bus.pio_read(0xafe0, 4).unwrap(), 0);
    assert!(bus.irqs.shutdowns.lock().unwrap().is_empty());
    bus.pio_write(0xb004, 2, 1 << 13).unwrap();
    assert_eq!(*bus.irqs.shutdowns.lock().unwrap(), vec![0]);
    // 0xcf8 reads back (Linux's pci_check_type1), through the machine itself.
    let mut m = bus.machine.lock().unwrap();
    let at = |addr, size| ioreq::IoAccess {
        space: ioreq::IoSpace::Port,
        addr,
        size,
    };
    assert!(ioreq::IoHandler::write(&mut *m, at(0xcf8, 4), 0x8000_0000));
    assert_eq!(
        ioreq::IoHandler::read(&mut *m, at(0xcf8, 4)),
        Some(0x8000_0000)
    );
    // Every one of those port ranges was registered with the ioreq server.
    for (s, e) in [
        (0x70, 0x71),
        (0xcf8, 0xcfb),
        (0x510, 0x511),
        (0xafe0, 0xafe3),
        (0xb004, 0xb005),
    ] {
        assert!(
            ranges.contains(&IoRange::Port { start: s, end: e }),
            "{s:#x}: {ranges:?}"
        );
    }
    assert!(m
        .devices()
        .iter()
        .any(|d| d.starts_with("fw_cfg 0x510: direct boot")));
}

#[test]
fn a_kernel_that_cannot_boot_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let (_, rom) = boot_files(&dir);
    let bad = dir.path().join("notakernel");
    std::fs::write(&bad, vec![0u8; 8192]).unwrap();
    let mut cfg = config("");
    cfg.kernel = Some(devmodel::config::KernelBoot {
        kernel: bad.clone(),
        initrd: None,
        cmdline: String::new(),
        rom,
    });
    let e = common::try_machine(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("notakernel") && e.contains("not a bzImage"),
        "{e}"
    );
}
