//! The same guest OS code as the direct-bus tests, now through the whole stack: xensim's
//! HVM vCPUs issue ioreqs exactly as Xen does, domio's ioreq server (attached to the xensim
//! daemon like a separate domio process) dispatches them into the machine, guest RAM is
//! foreign-mapped through the daemon, and interrupts come back as DMOPs.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use devmodel::config::MachineConfig;
use devmodel::mem::ForeignRam;
use devmodel::Machine;
use ioreq::{IoreqConfig, IoreqServer};
use xen::{DeviceModel, XenHost};
use xensim::client::SimHost;
use xensim::guestos::blk::{Op, VirtioBlkDriver, T_IN, T_OUT};
use xensim::guestos::pci::{self, BarWindow};
use xensim::guestos::platform::{self, Unplug};
use xensim::guestos::uart::Uart;
use xensim::guestos::RamAlloc;
use xensim::host::Host;
use xensim::hvm::{HvmBus, HvmGuest, Irq};
use xensim::server::Server;

const MEMORY_MIB: u64 = 80;

struct Rig {
    _host: Arc<Host>,
    _server: Server,
    _sim: Arc<SimHost>,
    ioreq: IoreqServer,
    guest: HvmGuest,
    _dir: tempfile::TempDir,
}

fn rig(dir: tempfile::TempDir, extra: &str) -> Rig {
    let host = Host::new().unwrap();
    let domid = host.create_hvm_domain("hvm", MEMORY_MIB << 8, 2).unwrap();
    let server = Server::start(host.clone(), &dir.path().join("xensim.sock")).unwrap();
    let sim = Arc::new(SimHost::connect(server.path(), 0).unwrap());
    let cfg = MachineConfig::parse(&format!(
        "name = \"g\"\ntype = \"hvm\"\nmemory = {MEMORY_MIB}\nvcpus = 2\n{extra}\n"
    ))
    .unwrap();
    let mut ioreq = IoreqServer::create(
        sim.as_ref() as &dyn XenHost,
        IoreqConfig::new(domid, 2, MEMORY_MIB << 20),
    )
    .unwrap();
    let dm: Arc<dyn DeviceModel> = Arc::from(sim.open_devmodel().unwrap());
    let ram = ForeignRam::new(sim.open_foreign().unwrap(), domid, MEMORY_MIB << 20);
    let machine = Machine::new(domid, &cfg, ioreq.ranges(), dm, Box::new(ram)).unwrap();
    ioreq.run(Box::new(machine)).unwrap();
    let mut guest = HvmGuest::new(host.clone(), domid, 0).unwrap();
    guest.set_timeout(Duration::from_secs(20));
    Rig {
        _host: host,
        _server: server,
        _sim: sim,
        ioreq,
        guest,
        _dir: dir,
    }
}

#[test]
fn guest_enumerates_unplugs_and_prints_through_ioreqs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("com1.log");
    let r = rig(dir, &format!("serial = 'file:{}'", log.display()));
    let g = &r.guest;
    let mut fns = pci::enumerate(g).unwrap();
    let ids: Vec<(u8, u16, u16)> = fns.iter().map(|f| (f.dev, f.vendor, f.device)).collect();
    assert_eq!(
        ids,
        vec![
            (0, 0x8086, 0x1237),
            (1, 0x8086, 0x7000),
            (2, 0x5853, 0x0001)
        ]
    );
    pci::assign_bars(g, &mut fns, &mut BarWindow::default()).unwrap();
    // The platform device's BAR1 is routed to domio now: its reads answer 0, not all ones.
    assert_eq!(g.mmio_read(fns[2].bars[1].unwrap().addr, 4).unwrap(), 0);
    assert_eq!(
        platform::unplug(g, 3, 42, 3).unwrap(),
        Unplug::Done { version: 1 }
    );
    let u = Uart::COM1;
    u.init(g).unwrap();
    u.write(g, b"through the ioreq server\n").unwrap();
    assert_eq!(std::fs::read(&log).unwrap(), b"through the ioreq server\n");
    // Loopback input raises IRQ 4 through XEN_DMOP_set_isa_irq_level.
    g.take_irqs();
    g.pio_write(0x3fc, 1, 0x1b).unwrap();
    g.pio_write(0x3f8, 1, u32::from(b'q')).unwrap();
    assert!(g.wait_irq(Duration::from_secs(5)));
    assert!(g.take_irqs().contains(&Irq::Isa {
        irq: 4,
        level: true
    }));
    assert_eq!(g.pio_read(0x3f8, 1).unwrap(), u32::from(b'q'));
    // Every access was claimed by the machine and none was malformed.
    let st = r.ioreq.stats();
    assert!(st.sync.load(std::sync::atomic::Ordering::Relaxed) > 100);
    assert_eq!(st.bad.load(std::sync::atomic::Ordering::Relaxed), 0);
}

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

fn blk_64mib(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(format!("d.{format}"));
    if format == "qcow2" {
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"])
            .output()
            .expect("qemu-img (qemu-utils)");
        assert!(out.status.success());
    } else {
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
    }
    let spec = format!(
        "virtio_queues = 2\ndisk = [ '{},{format},xvda,rw' ]",
        img.display()
    );
    let r = rig(dir, &spec);
    let g = &r.guest;
    let mut fns = pci::enumerate(g).unwrap();
    pci::assign_bars(g, &mut fns, &mut BarWindow::default()).unwrap();
    let f = fns.iter().find(|f| f.device == 0x1042).unwrap().clone();
    let (data, len) = (1u64 << 20, 64u64 << 20);
    let ram = RamAlloc::new(data + len, MEMORY_MIB << 20);
    let mut drv = VirtioBlkDriver::new(g, &f, &ram, 0x50, 2, 128).unwrap();
    let want = pattern(0xabcd, len as usize);
    g.ram_write(data, &want).unwrap();
    let chunk = 1u64 << 20;
    let ops = |ty| -> Vec<Op> {
        (0..len / chunk)
            .map(|i| Op {
                ty,
                sector: i * chunk / 512,
                gpa: data + i * chunk,
                len: chunk as u32,
            })
            .collect()
    };
    assert!(drv
        .run(g, &ops(T_OUT), Duration::from_secs(120))
        .unwrap()
        .iter()
        .all(|s| *s == 0));
    assert_eq!(drv.flush(g).unwrap(), 0);
    g.ram_write(data, &vec![0u8; len as usize]).unwrap();
    assert!(drv
        .run(g, &ops(T_IN), Duration::from_secs(120))
        .unwrap()
        .iter()
        .all(|s| *s == 0));
    let mut back = vec![0u8; len as usize];
    g.ram_read(data, &mut back).unwrap();
    assert!(
        back == want,
        "64 MiB read back through the ioreq path differs"
    );
    // Reset hands the engine back after its in-flight work is done.
    drv.dev.reset(g).unwrap();
    if format == "qcow2" {
        let out = Command::new("qemu-img")
            .args(["check", img.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn virtio_blk_64mib_raw_through_ioreqs() {
    blk_64mib("raw");
}

#[test]
fn virtio_blk_64mib_qcow2_through_ioreqs() {
    blk_64mib("qcow2");
}

/// virtio-net through the whole stack: the guest's TCP/IP stack on the virtio-net driver,
/// doorbells as ioreqs, completions as MSIs, a real tap in a network namespace of the
/// test's own, and 4 MiB of TCP each way with Linux.
#[test]
fn virtio_net_tcp_through_ioreqs() {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener};
    use xensim::front::netstack::{fill_pattern, NetConfig, NetStack, StreamSum};
    use xensim::guestos::net::VirtioNetDriver;

    std::thread::spawn(|| {
        common::sys::unshare_netns().expect("unshare(CLONE_NEWNET)");
        common::ip(&["link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().unwrap();
        let r = rig(dir, "vif = [ 'mac=00:16:3e:4d:00:09,vifname=dmtap9' ]");
        common::ip(&["addr", "add", "10.78.0.1/24", "dev", "dmtap9"]);
        let g = Arc::new(r.guest.vcpu(1).unwrap());
        let mut fns = pci::enumerate(g.as_ref()).unwrap();
        pci::assign_bars(g.as_ref(), &mut fns, &mut BarWindow::default()).unwrap();
        let f = fns.iter().find(|f| f.device == 0x1041).unwrap().clone();
        let ram = RamAlloc::new(1 << 20, MEMORY_MIB << 20);
        let drv = VirtioNetDriver::new(g.clone(), &f, &ram, 0x90, 256, true).unwrap();
        let mac = drv.mac;
        let mut stack =
            NetStack::new(drv, &NetConfig::ipv4(mac, Ipv4Addr::new(10, 78, 0, 2), 24)).unwrap();
        let linux = Ipv4Addr::new(10, 78, 0, 1);
        let n: u64 = 4 << 20;
        let l = TcpListener::bind((linux, 6001)).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut sum = StreamSum::default();
            let mut buf = vec![0u8; 1 << 16];
            let mut off = 0u64;
            while off < n {
                let k = buf.len().min((n - off) as usize);
                fill_pattern(off, &mut buf[..k]);
                s.write_all(&buf[..k]).unwrap();
                sum.update(&buf[..k]);
                off += k as u64;
            }
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut back = StreamSum::default();
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => back.update(&buf[..k]),
                    Err(e) => panic!("{e}"),
                }
            }
            (sum, back)
        });
        let h = stack
            .tcp_connect(SocketAddr::from((linux, 6001)), Duration::from_secs(20))
            .unwrap();
        let got = stack.tcp_recv_all(h, Duration::from_secs(60)).unwrap();
        let sent = stack
            .tcp_send_pattern(h, n, Duration::from_secs(60))
            .unwrap();
        let (linux_sent, linux_got) = server.join().unwrap();
        assert_eq!(got.sum, linux_sent, "Linux -> guest");
        assert_eq!(sent.sum, linux_got, "guest -> Linux");
    })
    .join()
    .unwrap();
}
