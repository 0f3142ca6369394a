//! A simulated host with one HVM guest, domio's ioreq server attached through the xensim
//! daemon (as a separate domio process attaches), and a scratch device behind it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ioreq::{IoAccess, IoHandler, IoSpace, IoreqConfig, IoreqServer, Sbdf};
use xen::{DomId, IoRange, XenHost};
use xensim::client::SimHost;
use xensim::host::Host;
use xensim::hvm::HvmGuest;
use xensim::server::Server;

/// Guest RAM: 16 MiB.
pub const RAM_PAGES: u64 = 4096;
/// Scratch registers: ports 0x100..=0x107.
pub const SCRATCH_PORT: u16 = 0x100;
/// A FIFO port: reads count up from 1, writes are recorded.
pub const FIFO_PORT: u16 = 0x200;
/// A write-only FIFO in the legacy VGA window (below 1 MiB, so Xen can buffer it).
pub const VGA_BASE: u64 = 0xa0000;
/// Scratch MMIO window.
pub const MMIO_BASE: u64 = 0xfe00_0000;
/// Its size.
pub const MMIO_LEN: u64 = 0x1000;
/// The scratch PCI function 00:03.0.
pub const PCI_DEV: Sbdf = Sbdf {
    seg: 0,
    bus: 0,
    dev: 3,
    func: 0,
};

/// A callback run on every access.
pub type Hook = Box<dyn FnMut(&IoAccess) + Send>;

/// What the scratch device saw and holds.
pub struct ScratchState {
    pub ports: [u8; 8],
    pub mmio: Vec<u8>,
    pub cfg: Vec<u8>,
    pub fifo_next: u64,
    pub fifo_out: Vec<u64>,
    pub accesses: Vec<(IoAccess, bool, u64)>,
    pub invalidates: u32,
    pub time_offsets: Vec<i64>,
    /// Called on every access before it is served (hostile tests mutate the slot here).
    pub hook: Option<Hook>,
}

/// A device of scratch registers behind the ioreq server.
#[derive(Clone)]
pub struct Scratch(pub Arc<Mutex<ScratchState>>);

impl Scratch {
    pub fn new() -> Scratch {
        let mut cfg = vec![0u8; 4096];
        cfg[0..4].copy_from_slice(&0x0001_5853u32.to_le_bytes());
        Scratch(Arc::new(Mutex::new(ScratchState {
            ports: [0; 8],
            mmio: vec![0; MMIO_LEN as usize],
            cfg,
            fifo_next: 1,
            fifo_out: Vec::new(),
            accesses: Vec::new(),
            invalidates: 0,
            time_offsets: Vec::new(),
            hook: None,
        })))
    }
    pub fn st(&self) -> MutexGuard<'_, ScratchState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn get(buf: &[u8], off: u64, size: u8) -> Option<u64> {
    let off = usize::try_from(off).ok()?;
    let b = buf.get(off..off + usize::from(size))?;
    let mut v = [0u8; 8];
    v[..b.len()].copy_from_slice(b);
    Some(u64::from_le_bytes(v))
}

fn put(buf: &mut [u8], off: u64, size: u8, value: u64) -> bool {
    let Ok(off) = usize::try_from(off) else {
        return false;
    };
    match buf.get_mut(off..off + usize::from(size)) {
        Some(b) => {
            b.copy_from_slice(&value.to_le_bytes()[..usize::from(size)]);
            true
        }
        None => false,
    }
}

impl IoHandler for Scratch {
    fn read(&mut self, a: IoAccess) -> Option<u64> {
        let mut st = self.st();
        if let Some(mut h) = st.hook.take() {
            drop(st);
            h(&a);
            st = self.st();
            st.hook = Some(h);
        }
        let v = match a.space {
            IoSpace::Port if a.addr == u64::from(FIFO_PORT) => {
                let v = st.fifo_next;
                st.fifo_next += 1;
                Some(v)
            }
            IoSpace::Port if (0x100..0x108).contains(&a.addr) => {
                get(&st.ports, a.addr - 0x100, a.size)
            }
            IoSpace::Mmio if a.addr >= MMIO_BASE => get(&st.mmio, a.addr - MMIO_BASE, a.size),
            IoSpace::PciConfig(s) if s == PCI_DEV => get(&st.cfg, a.addr, a.size),
            _ => None,
        };
        st.accesses.push((a, false, v.unwrap_or(u64::MAX)));
        v
    }

    fn write(&mut self, a: IoAccess, value: u64) -> bool {
        let mut st = self.st();
        if let Some(mut h) = st.hook.take() {
            drop(st);
            h(&a);
            st = self.st();
            st.hook = Some(h);
        }
        st.accesses.push((a, true, value));
        match a.space {
            IoSpace::Port if a.addr == u64::from(FIFO_PORT) => {
                st.fifo_out.push(value);
                true
            }
            IoSpace::Port if (0x100..0x108).contains(&a.addr) => {
                put(&mut st.ports, a.addr - 0x100, a.size, value)
            }
            IoSpace::Mmio if a.addr == VGA_BASE => {
                st.fifo_out.push(value);
                true
            }
            IoSpace::Mmio if a.addr >= MMIO_BASE => {
                put(&mut st.mmio, a.addr - MMIO_BASE, a.size, value)
            }
            IoSpace::PciConfig(s) if s == PCI_DEV => put(&mut st.cfg, a.addr, a.size, value),
            _ => false,
        }
    }

    fn invalidate(&mut self) {
        self.st().invalidates += 1;
    }

    fn time_offset(&mut self, offset: i64) {
        self.st().time_offsets.push(offset);
    }
}

/// The whole rig.
pub struct Rig {
    pub host: Arc<Host>,
    pub server: Server,
    pub sim: Arc<SimHost>,
    pub domid: DomId,
    pub ioreq: IoreqServer,
    pub dev: Scratch,
    pub guest: HvmGuest,
    _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ioreq-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn rig_with(cfg_fn: impl FnOnce(&mut IoreqConfig), vcpus: u32) -> Rig {
    let dir = TempDir::new();
    let host = Host::new().unwrap();
    let domid = host.create_hvm_domain("hvm", RAM_PAGES, vcpus).unwrap();
    let server = Server::start(host.clone(), &dir.0.join("xensim.sock")).unwrap();
    let sim = Arc::new(SimHost::connect(server.path(), 0).unwrap());
    let mut cfg = IoreqConfig::new(domid, vcpus, RAM_PAGES * 4096);
    cfg_fn(&mut cfg);
    let mut ioreq = IoreqServer::create(sim.as_ref() as &dyn XenHost, cfg).unwrap();
    let ranges = ioreq.ranges();
    ranges
        .map(IoRange::Port {
            start: 0x100,
            end: 0x107,
        })
        .unwrap();
    ranges
        .map(IoRange::Port {
            start: u64::from(FIFO_PORT),
            end: u64::from(FIFO_PORT) + 3,
        })
        .unwrap();
    ranges
        .map(IoRange::Mmio {
            start: MMIO_BASE,
            end: MMIO_BASE + MMIO_LEN - 1,
        })
        .unwrap();
    ranges
        .map(IoRange::Mmio {
            start: VGA_BASE,
            end: VGA_BASE + 0xfff,
        })
        .unwrap();
    ranges
        .map(IoRange::Pci {
            seg: 0,
            bus: 0,
            dev: PCI_DEV.dev,
            func: 0,
        })
        .unwrap();
    let dev = Scratch::new();
    ioreq.run(Box::new(dev.clone())).unwrap();
    let mut guest = HvmGuest::new(host.clone(), domid, 0).unwrap();
    guest.set_timeout(Duration::from_secs(20));
    Rig {
        host,
        server,
        sim,
        domid,
        ioreq,
        dev,
        guest,
        _dir: dir,
    }
}

pub fn rig() -> Rig {
    rig_with(|_| {}, 2)
}
