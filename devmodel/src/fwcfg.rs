//! QEMU's firmware configuration device (fw_cfg, docs/specs/fw_cfg.rst in QEMU), as SeaBIOS
//! finds it on an HVM guest: a 16-bit selector at port 0x510 and an 8-bit data port at 0x511
//! (the traditional interface; no DMA, as qemu-xen 7.2 under Xen), and the Linux boot
//! protocol (Documentation/x86/boot.rst) that fills it for a direct kernel boot: the kernel's
//! setup and protected-mode parts, the initrd and the command line, with the option ROM that
//! SeaBIOS runs to load them (`genroms/linuxboot.bin`) first in `bootorder`.
//!
//! Everything here comes from the toolstack (files it named), not the guest; what the guest
//! controls is the selector and how far it reads, which are bounded by the item's length
//! (reads past the end, and of unknown keys, return 0 as QEMU's do).

use std::collections::BTreeMap;

/// The selector port.
pub const PORT_SELECTOR: u16 = 0x510;
/// The data port.
pub const PORT_DATA: u16 = 0x511;

/// Keys (QEMU's include/standard-headers/linux/qemu_fw_cfg.h numbering).
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Interface bits: 1 = traditional.
    pub const ID: u16 = 0x01;
    /// vCPUs (u16).
    pub const NB_CPUS: u16 = 0x05;
    /// Where the protected-mode kernel goes (u32).
    pub const KERNEL_ADDR: u16 = 0x07;
    /// Its size (u32).
    pub const KERNEL_SIZE: u16 = 0x08;
    /// Where the initrd goes (u32).
    pub const INITRD_ADDR: u16 = 0x0a;
    /// Its size (u32).
    pub const INITRD_SIZE: u16 = 0x0b;
    /// Boot menu wanted (u16).
    pub const BOOT_MENU: u16 = 0x0e;
    /// The protected-mode kernel.
    pub const KERNEL_DATA: u16 = 0x11;
    /// The initrd.
    pub const INITRD_DATA: u16 = 0x12;
    /// Where the command line goes (u32).
    pub const CMDLINE_ADDR: u16 = 0x13;
    /// Its size with the NUL (u32).
    pub const CMDLINE_SIZE: u16 = 0x14;
    /// The command line, NUL-terminated.
    pub const CMDLINE_DATA: u16 = 0x15;
    /// Where the real-mode setup goes (u32).
    pub const SETUP_ADDR: u16 = 0x16;
    /// Its size (u32).
    pub const SETUP_SIZE: u16 = 0x17;
    /// The setup sectors, header patched for this boot.
    pub const SETUP_DATA: u16 = 0x18;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x19;
    /// The first key given to a file.
    pub const FILE_FIRST: u16 = 0x20;
}

/// Where the pieces of a direct Linux boot go (QEMU's choices for a "high and recent"
/// bzImage, which SeaBIOS's linuxboot ROM expects).
pub const SETUP_ADDR: u32 = 0x10000;
/// The command line.
pub const CMDLINE_ADDR: u32 = 0x20000;
/// The protected-mode kernel.
pub const KERNEL_ADDR: u32 = 0x100000;
/// Kept free at the top of RAM below 4 GiB, above the initrd (SeaBIOS's own pages there).
pub const TOP_RESERVE: u64 = 0x10_0000;

/// Errors setting up a direct kernel boot, naming the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum FwCfgError {
    /// A file that cannot be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a kernel this loader boots.
    #[error("kernel {path}: {why}")]
    Kernel {
        /// Its path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// Does not fit the guest's memory.
    #[error("{what} of {size} bytes does not fit below {limit:#x} in the guest's memory")]
    TooBig {
        /// Which part.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// An option ROM that SeaBIOS would refuse.
    #[error("option ROM {path}: {why}")]
    Rom {
        /// Its path.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// The device.
#[derive(Debug, Default)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
    /// Boot items whose read has been logged (once each: the guest controls how often it
    /// reads them).
    logged: Vec<u16>,
}

impl FwCfg {
    /// The items every guest gets: signature, interface, vCPUs, no boot menu.
    pub fn new(vcpus: u16) -> FwCfg {
        let mut f = FwCfg::default();
        f.items.insert(key::SIGNATURE, b"QEMU".to_vec());
        f.items.insert(key::ID, 1u32.to_le_bytes().to_vec());
        f.items.insert(key::NB_CPUS, vcpus.to_le_bytes().to_vec());
        f.items.insert(key::BOOT_MENU, 0u16.to_le_bytes().to_vec());
        f.rebuild_dir();
        f
    }

    /// Sets item `k`.
    pub fn set(&mut self, k: u16, data: Vec<u8>) {
        self.items.insert(k, data);
    }

    /// Sets item `k` to a little-endian u32.
    pub fn set_u32(&mut self, k: u16, v: u32) {
        self.set(k, v.to_le_bytes().to_vec());
    }

    /// Adds (or replaces) a named file.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) {
        let k = match self.files.iter().find(|(n, _)| n == name) {
            Some((_, k)) => *k,
            None => {
                let k = key::FILE_FIRST + self.files.len() as u16;
                self.files.push((name.to_string(), k));
                k
            }
        };
        self.items.insert(k, data);
        self.rebuild_dir();
    }

    /// The directory: a big-endian count, then per file a big-endian size and select key, two
    /// reserved bytes and a 56-byte NUL-padded name.
    fn rebuild_dir(&mut self) {
        let mut d = (self.files.len() as u32).to_be_bytes().to_vec();
        for (name, k) in &self.files {
            let size = self.items.get(k).map_or(0, Vec::len) as u32;
            d.extend_from_slice(&size.to_be_bytes());
            d.extend_from_slice(&k.to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            let mut n = [0u8; 56];
            let b = name.as_bytes();
            let len = b.len().min(55);
            n[..len].copy_from_slice(&b[..len]);
            d.extend_from_slice(&n);
        }
        self.items.insert(key::FILE_DIR, d);
    }

    /// A write to the selector: selects `k` and rewinds. How much of the item selected
    /// before was read is logged for the large ones (the kernel, initrd and setup), so that
    /// a boot can be checked against what the firmware was served.
    pub fn select(&mut self, k: u16) {
        let len = self.items.get(&self.selected).map_or(0, Vec::len);
        if is_boot_blob(self.selected)
            && self.offset > 0
            && self.offset != len
            && self.first_log(self.selected)
        {
            tracing::warn!(
                key = self.selected,
                read = self.offset,
                size = len,
                "fw_cfg: the firmware read {} of {len} bytes of item {:#x}",
                self.offset,
                self.selected
            );
        }
        self.selected = k;
        self.offset = 0;
    }

    /// A read of the data port: the next byte of the selected item, 0 past its end.
    pub fn read_byte(&mut self) -> u8 {
        let item = self.items.get(&self.selected);
        let b = item.and_then(|d| d.get(self.offset)).copied().unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        if let Some(d) = item {
            if self.offset == d.len()
                && is_boot_blob(self.selected)
                && !self.logged.contains(&self.selected)
            {
                self.logged.push(self.selected);
                tracing::info!(
                    key = self.selected,
                    size = d.len(),
                    "fw_cfg: the firmware read all {} bytes of item {:#x}",
                    d.len(),
                    self.selected
                );
            }
        }
        b
    }

    /// Whether item `k`'s read is logged for the first time (it then counts as logged).
    fn first_log(&mut self, k: u16) -> bool {
        if self.logged.contains(&k) {
            return false;
        }
        self.logged.push(k);
        true
    }

    /// Item `k`, for tests and logs.
    pub fn item(&self, k: u16) -> Option<&[u8]> {
        self.items.get(&k).map(Vec::as_slice)
    }

    /// Sets up a direct boot of the bzImage `kernel` with `initrd` and `cmdline`, loaded by
    /// the option ROM `rom`, for a guest with `ram_below_4g` bytes of RAM below 4 GiB.
    pub fn load_linux(
        &mut self,
        kernel: (&str, &[u8]),
        initrd: Option<(&str, &[u8])>,
        cmdline: &str,
        rom: (&str, &[u8]),
        ram_below_4g: u64,
    ) -> Result<(), FwCfgError> {
        let (kpath, k) = kernel;
        let bad = |why: &str| FwCfgError::Kernel {
            path: kpath.to_string(),
            why: why.to_string(),
        };
        check_rom(rom.0, rom.1)?;
        if k.len() < 0x250 || &k[0x202..0x206] != b"HdrS" {
            return Err(bad("not a bzImage (no \"HdrS\" boot header at 0x202)"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([k[o], k[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([k[o], k[o + 1], k[o + 2], k[o + 3]]);
        let protocol = u16_at(0x206);
        if protocol < 0x202 {
            return Err(bad(&format!(
                "boot protocol {protocol:#x} is older than 2.02 (no relocatable command line)"
            )));
        }
        if k[0x211] & 0x01 == 0 {
            return Err(bad("a zImage (not loaded high): only bzImages boot here"));
        }
        let setup_sects = match k[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let setup_size = (setup_sects + 1) * 512;
        if setup_size >= k.len() {
            return Err(bad("the setup sectors are larger than the file"));
        }
        if setup_size > (CMDLINE_ADDR - SETUP_ADDR) as usize {
            return Err(bad("the setup sectors do not fit below the command line"));
        }
        let mut setup = k[..setup_size].to_vec();
        let prot = &k[setup_size..];
        let limit_4g = ram_below_4g.saturating_sub(TOP_RESERVE);
        if (KERNEL_ADDR as u64).saturating_add(prot.len() as u64) > limit_4g {
            return Err(FwCfgError::TooBig {
                what: "the kernel",
                size: prot.len() as u64,
                limit: limit_4g,
            });
        }
        let cmd_size = cmdline.len() + 1;
        let cmdline_max = if protocol >= 0x206 {
            u32_at(0x238) as usize
        } else {
            255
        };
        if cmdline.len() > cmdline_max || cmd_size > 0x10000 {
            return Err(bad(&format!(
                "the command line is {} bytes; this kernel takes {cmdline_max}",
                cmdline.len()
            )));
        }
        let mut initrd_addr = 0u32;
        let mut initrd_size = 0u32;
        if let Some((ipath, data)) = initrd {
            let max = if protocol >= 0x203 {
                u64::from(u32_at(0x22c))
            } else {
                0x37ff_ffff
            };
            let top = max.min(limit_4g.saturating_sub(1));
            let size = data.len() as u64;
            let kernel_end = u64::from(KERNEL_ADDR) + prot.len() as u64;
            let addr = top.saturating_sub(size) & !0xfff;
            if size > top || addr < kernel_end {
                return Err(FwCfgError::TooBig {
                    what: "the initrd",
                    size,
                    limit: top,
                });
            }
            let _ = ipath;
            initrd_addr = addr as u32;
            initrd_size = size as u32;
            self.set_u32(key::INITRD_ADDR, initrd_addr);
            self.set_u32(key::INITRD_SIZE, initrd_size);
            self.set(key::INITRD_DATA, data.to_vec());
        }
        // The setup header, as a boot loader fills it (boot.rst, "Details of header fields").
        let put32 =
            |s: &mut Vec<u8>, o: usize, v: u32| s[o..o + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut setup, 0x228, CMDLINE_ADDR); // cmd_line_ptr
        setup[0x210] = 0xb0; // type_of_loader: "undefined", as QEMU
        setup[0x211] |= 0x80; // loadflags: CAN_USE_HEAP
        let heap_end = (CMDLINE_ADDR - SETUP_ADDR - 0x200) as u16;
        setup[0x224..0x226].copy_from_slice(&heap_end.to_le_bytes()); // heap_end_ptr
        put32(&mut setup, 0x218, initrd_addr); // ramdisk_image
        put32(&mut setup, 0x21c, initrd_size); // ramdisk_size
        self.set_u32(key::SETUP_ADDR, SETUP_ADDR);
        self.set_u32(key::SETUP_SIZE, setup.len() as u32);
        self.set(key::SETUP_DATA, setup);
        self.set_u32(key::KERNEL_ADDR, KERNEL_ADDR);
        self.set_u32(key::KERNEL_SIZE, prot.len() as u32);
        self.set(key::KERNEL_DATA, prot.to_vec());
        let mut c = cmdline.as_bytes().to_vec();
        c.push(0);
        self.set_u32(key::CMDLINE_ADDR, CMDLINE_ADDR);
        self.set_u32(key::CMDLINE_SIZE, c.len() as u32);
        self.set(key::CMDLINE_DATA, c);
        self.add_file("genroms/linuxboot.bin", rom.1.to_vec());
        self.add_file("bootorder", b"/rom@genroms/linuxboot.bin\n\0".to_vec());
        Ok(())
    }
}

/// The items of a direct boot, whose reads are logged.
fn is_boot_blob(k: u16) -> bool {
    matches!(
        k,
        key::KERNEL_DATA | key::INITRD_DATA | key::SETUP_DATA | key::CMDLINE_DATA
    )
}

/// What SeaBIOS checks before it runs a ROM: the 0x55aa signature, a length byte that covers
/// the file in 512-byte units, and a byte sum of 0.
fn check_rom(path: &str, rom: &[u8]) -> Result<(), FwCfgError> {
    let bad = |why: String| FwCfgError::Rom {
        path: path.to_string(),
        why,
    };
    if rom.len() < 512 || rom[0] != 0x55 || rom[1] != 0xaa {
        return Err(bad("no 0x55aa option ROM signature".into()));
    }
    let len = usize::from(rom[2]) * 512;
    if len == 0 || len > rom.len() {
        return Err(bad(format!(
            "its header says {len} bytes, the file has {}",
            rom.len()
        )));
    }
    if rom[..len].iter().fold(0u8, |a, b| a.wrapping_add(*b)) != 0 {
        return Err(bad("its checksum is wrong".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(f: &mut FwCfg, k: u16, n: usize) -> Vec<u8> {
        f.select(k);
        (0..n).map(|_| f.read_byte()).collect()
    }

    /// A minimal bzImage: 4 setup sectors (setup_sects 0 means 4), boot protocol 2.15,
    /// loaded high, initrd_addr_max 0x7fffffff, cmdline_size 2047, and `body` after.
    fn bzimage(body: usize) -> Vec<u8> {
        let mut k = vec![0u8; 5 * 512 + body];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        k[0x211] = 0x01;
        k[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        k[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        for (i, b) in k[5 * 512..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        k
    }

    fn rom() -> Vec<u8> {
        let mut r = vec![0u8; 1024];
        r[0] = 0x55;
        r[1] = 0xaa;
        r[2] = 2;
        let sum = r.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        r[1023] = 0u8.wrapping_sub(sum);
        r
    }

    #[test]
    fn test_signature_id_and_unknown_keys_read_as_seabios_expects() {
        let mut f = FwCfg::new(2);
        assert_eq!(read_item(&mut f, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut f, key::ID, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&mut f, key::NB_CPUS, 2), [2, 0]);
        assert_eq!(read_item(&mut f, 0x8000, 2), [0, 0]);
        assert_eq!(
            read_item(&mut f, key::SIGNATURE, 6),
            [b'Q', b'E', b'M', b'U', 0, 0]
        );
    }

    #[test]
    fn test_a_guest_rereading_boot_items_is_logged_once_per_item() {
        let mut f = FwCfg::new(1);
        for _ in 0..1000 {
            for k in [key::KERNEL_DATA, key::CMDLINE_DATA, key::SETUP_DATA] {
                f.select(k);
                f.read_byte();
                f.select(key::SIGNATURE);
            }
        }
        assert!(f.logged.len() <= 4, "{:?}", f.logged);
    }

    #[test]
    fn test_file_directory_is_big_endian_with_56_byte_names() {
        let mut f = FwCfg::new(1);
        f.add_file("bootorder", b"/rom@x\n\0".to_vec());
        f.add_file("genroms/linuxboot.bin", vec![7; 1024]);
        let d = f.item(key::FILE_DIR).unwrap().to_vec();
        assert_eq!(d.len(), 4 + 2 * 64);
        assert_eq!(&d[0..4], &2u32.to_be_bytes());
        let e = &d[4 + 64..4 + 128];
        assert_eq!(&e[0..4], &1024u32.to_be_bytes());
        assert_eq!(&e[4..6], &(key::FILE_FIRST + 1).to_be_bytes());
        assert_eq!(&e[8..29], b"genroms/linuxboot.bin");
        assert_eq!(e[29], 0);
        assert_eq!(read_item(&mut f, key::FILE_FIRST + 1, 2), [7, 7]);
    }

    #[test]
    fn test_load_linux_splits_the_kernel_and_patches_the_header_as_a_boot_loader() {
        let mut f = FwCfg::new(1);
        let k = bzimage(64 * 1024);
        let initrd = vec![0xabu8; 10_000];
        let ram = 256u64 << 20;
        f.load_linux(
            ("vmlinuz", &k),
            Some(("initrd", &initrd)),
            "console=ttyS0",
            ("rom", &rom()),
            ram,
        )
        .unwrap();
        let u32_of = |f: &FwCfg, k: u16| u32::from_le_bytes(f.item(k).unwrap().try_into().unwrap());
        assert_eq!(u32_of(&f, key::SETUP_SIZE), 5 * 512);
        assert_eq!(u32_of(&f, key::KERNEL_SIZE), 64 * 1024);
        assert_eq!(f.item(key::KERNEL_DATA).unwrap(), &k[5 * 512..]);
        assert_eq!(f.item(key::CMDLINE_DATA).unwrap(), b"console=ttyS0\0");
        let ia = u32_of(&f, key::INITRD_ADDR) as u64;
        assert_eq!(ia % 4096, 0);
        assert!(ia + initrd.len() as u64 <= ram - TOP_RESERVE, "{ia:#x}");
        assert!(ia >= 0x100000 + 64 * 1024);
        let s = f.item(key::SETUP_DATA).unwrap();
        assert_eq!(&s[0x228..0x22c], &CMDLINE_ADDR.to_le_bytes());
        assert_eq!(s[0x210], 0xb0);
        assert_eq!(s[0x211], 0x81);
        assert_eq!(&s[0x218..0x21c], &(ia as u32).to_le_bytes());
        assert_eq!(&s[0x21c..0x220], &10_000u32.to_le_bytes());
        assert_eq!(&s[0x224..0x226], &0xfe00u16.to_le_bytes());
        let dir = f.item(key::FILE_DIR).unwrap();
        assert_eq!(&dir[0..4], &2u32.to_be_bytes());
        let boot = f.item(key::FILE_FIRST + 1).unwrap();
        assert_eq!(boot, b"/rom@genroms/linuxboot.bin\n\0");
    }

    #[test]
    fn test_load_linux_refuses_what_cannot_boot_by_name() {
        let mut f = FwCfg::new(1);
        let r = rom();
        let e = f
            .load_linux(("/x", &[0u8; 4096]), None, "", ("rom", &r), 64 << 20)
            .unwrap_err();
        assert!(e.to_string().contains("not a bzImage"), "{e}");
        let mut old = bzimage(4096);
        old[0x206..0x208].copy_from_slice(&0x0201u16.to_le_bytes());
        let e = f
            .load_linux(("/x", &old), None, "", ("rom", &r), 64 << 20)
            .unwrap_err();
        assert!(e.to_string().contains("older than 2.02"), "{e}");
        let k = bzimage(4096);
        let e = f
            .load_linux(
                ("/x", &k),
                Some(("/i", &vec![0; 70 << 20])),
                "",
                ("rom", &r),
                64 << 20,
            )
            .unwrap_err();
        assert!(e.to_string().contains("the initrd"), "{e}");
        let e = f
            .load_linux(("/x", &k), None, &"a".repeat(3000), ("rom", &r), 64 << 20)
            .unwrap_err();
        assert!(e.to_string().contains("2047"), "{e}");
        let mut bad_rom = r.clone();
        bad_rom[100] ^= 1;
        let e = f
            .load_linux(("/x", &k), None, "", ("/r.bin", &bad_rom), 64 << 20)
            .unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }
}
