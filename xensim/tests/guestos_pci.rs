//! The guest OS library's PCI code against a bus of hand-built configuration spaces (no
//! device model): 64-bit and I/O BAR sizing, multi-function devices, BAR assignment and
//! command bits, and a capability list that loops (the walk must stop).

use std::sync::Mutex;
use std::time::Duration;

use xensim::guestos::pci::{self, BarWindow};
use xensim::hvm::{HvmBus, Irq};

/// One function's config space with BAR masks applied on write.
struct Func {
    dev: u8,
    func: u8,
    cfg: [u8; 256],
    /// Writable bits of each BAR dword (0 for none).
    bar_mask: [u32; 6],
}

impl Func {
    fn new(dev: u8, func: u8, vendor: u16, device: u16, header: u8) -> Func {
        let mut cfg = [0u8; 256];
        cfg[0..2].copy_from_slice(&vendor.to_le_bytes());
        cfg[2..4].copy_from_slice(&device.to_le_bytes());
        cfg[0x0e] = header;
        Func {
            dev,
            func,
            cfg,
            bar_mask: [0; 6],
        }
    }
    fn rd(&self, off: usize, size: usize) -> u32 {
        (0..size)
            .rev()
            .fold(0, |v, i| (v << 8) | u32::from(self.cfg[off + i]))
    }
    fn wr(&mut self, off: usize, size: usize, v: u32) {
        if (0x10..0x28).contains(&off) && size == 4 {
            let i = (off - 0x10) / 4;
            let ro = self.rd(off, 4) & !self.bar_mask[i];
            let nv = (v & self.bar_mask[i]) | ro;
            self.cfg[off..off + 4].copy_from_slice(&nv.to_le_bytes());
            return;
        }
        if off == 4 && size == 2 {
            self.cfg[4..6].copy_from_slice(&(v as u16).to_le_bytes());
        }
    }
}

struct FakeBus {
    cf8: Mutex<u32>,
    funcs: Mutex<Vec<Func>>,
}

#[derive(Debug, thiserror::Error)]
#[error("fake bus")]
struct NoErr;

impl FakeBus {
    fn target(&self) -> Option<(u8, u8, usize)> {
        let a = *self.cf8.lock().unwrap();
        (a & 0x8000_0000 != 0 && (a >> 16) & 0xff == 0).then_some((
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
            (a & 0xfc) as usize,
        ))
    }
}

impl HvmBus for FakeBus {
    type Error = NoErr;
    fn pio_read(&self, port: u16, size: u8) -> Result<u32, NoErr> {
        if port == 0xcf8 {
            return Ok(*self.cf8.lock().unwrap());
        }
        let ones = if size == 4 {
            u32::MAX
        } else {
            (1 << (8 * size)) - 1
        };
        let Some((d, f, reg)) = self.target().filter(|_| (0xcfc..0xd00).contains(&port)) else {
            return Ok(ones);
        };
        let funcs = self.funcs.lock().unwrap();
        Ok(funcs
            .iter()
            .find(|x| (x.dev, x.func) == (d, f))
            .map_or(ones, |x| {
                x.rd(reg + usize::from(port - 0xcfc), usize::from(size))
            }))
    }
    fn pio_write(&self, port: u16, size: u8, value: u32) -> Result<(), NoErr> {
        if port == 0xcf8 && size == 4 {
            *self.cf8.lock().unwrap() = value;
        } else if let Some((d, f, reg)) = self.target().filter(|_| (0xcfc..0xd00).contains(&port)) {
            if let Some(x) = self
                .funcs
                .lock()
                .unwrap()
                .iter_mut()
                .find(|x| (x.dev, x.func) == (d, f))
            {
                x.wr(reg + usize::from(port - 0xcfc), usize::from(size), value);
            }
        }
        Ok(())
    }
    fn mmio_read(&self, _gpa: u64, _size: u8) -> Result<u64, NoErr> {
        Ok(u64::MAX)
    }
    fn mmio_write(&self, _gpa: u64, _size: u8, _value: u64) -> Result<(), NoErr> {
        Ok(())
    }
    fn ram_size(&self) -> u64 {
        0
    }
    fn ram_read(&self, _gpa: u64, _buf: &mut [u8]) -> Result<(), NoErr> {
        Err(NoErr)
    }
    fn ram_write(&self, _gpa: u64, _data: &[u8]) -> Result<(), NoErr> {
        Err(NoErr)
    }
    fn take_irqs(&self) -> Vec<Irq> {
        Vec::new()
    }
    fn wait_irq(&self, _timeout: Duration) -> bool {
        false
    }
}

#[test]
fn sizing_assignment_multifunction_and_a_looping_capability_list() {
    // 00:05.0: multi-function; BAR0 64-bit prefetchable 1 MiB, BAR2 I/O 32 bytes.
    let mut f0 = Func::new(5, 0, 0x1234, 0x0001, 0x80);
    f0.cfg[0x10] = 0x0c;
    f0.bar_mask[0] = 0xfff0_0000;
    f0.bar_mask[1] = 0xffff_ffff;
    f0.cfg[0x18] = 0x01;
    f0.bar_mask[2] = 0xffff_ffe0;
    // A capability list that loops: 0x40 -> 0x50 -> 0x40.
    f0.cfg[0x06] = 0x10;
    f0.cfg[0x34] = 0x40;
    f0.cfg[0x40] = 0x05;
    f0.cfg[0x41] = 0x50;
    f0.cfg[0x50] = 0x11;
    f0.cfg[0x51] = 0x40;
    let f1 = Func::new(5, 1, 0x1234, 0x0002, 0x00);
    // 00:06.0 is single-function: function 1 there must not be probed.
    let f2 = Func::new(6, 0, 0x1234, 0x0003, 0x00);
    let ghost = Func::new(6, 1, 0x1234, 0x0004, 0x00);
    let bus = FakeBus {
        cf8: Mutex::new(0),
        funcs: Mutex::new(vec![f0, f1, f2, ghost]),
    };
    let mut fns = pci::enumerate(&bus).unwrap();
    let ids: Vec<(u8, u8, u16)> = fns.iter().map(|f| (f.dev, f.func, f.device)).collect();
    assert_eq!(ids, vec![(5, 0, 1), (5, 1, 2), (6, 0, 3)]);
    let b0 = fns[0].bars[0].unwrap();
    assert!(b0.is64 && b0.prefetchable && !b0.io && b0.size == 1 << 20);
    assert!(
        fns[0].bars[1].is_none(),
        "the upper half of a 64-bit BAR is not a BAR"
    );
    let b2 = fns[0].bars[2].unwrap();
    assert!(b2.io && b2.size == 32);
    assert_eq!(fns[0].caps.len(), 48, "the looping list is cut off");
    assert_eq!((fns[0].caps[0].id, fns[0].caps[1].id), (0x05, 0x11));
    let mut w = BarWindow::default();
    pci::assign_bars(&bus, &mut fns, &mut w).unwrap();
    let a0 = fns[0].bars[0].unwrap().addr;
    assert_eq!(a0 % (1 << 20), 0);
    assert_eq!(
        u64::from(fns[0].read(&bus, 0x10, 4).unwrap() & !0xf)
            | (u64::from(fns[0].read(&bus, 0x14, 4).unwrap()) << 32),
        a0
    );
    assert_eq!(fns[0].read(&bus, 0x18, 4).unwrap(), 0xc001);
    assert_eq!(fns[0].read(&bus, 4, 2).unwrap() & 7, 7);
    assert_eq!(
        fns[1].read(&bus, 4, 2).unwrap() & 7,
        0,
        "no BARs, decoding left off"
    );
    // A window too small is an error, not a wrap.
    let mut tiny = BarWindow {
        io: 0xfff0,
        io_end: 0x1_0000,
        mem: 0xfff0_0000,
        mem_end: 0xfff8_0000,
    };
    assert!(pci::assign_bars(&bus, &mut fns, &mut tiny).is_err());
}
