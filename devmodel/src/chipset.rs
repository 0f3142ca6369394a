//! The few PC chipset ports that Xen forwards to the device model and that hvmloader,
//! SeaBIOS and Linux need (the rest of the PC, PIT, PIC, IOAPIC, HPET, the RTC's clock and the
//! ACPI event and timer registers, Xen emulates itself):
//!
//! - **0xcf8** (configuration address, 4 bytes): Xen latches it to route 0xcfc accesses as
//!   PCI-config ioreqs, and also forwards it; it must read back what was written, or Linux's
//!   `pci_check_type1` finds no PCI bus and so no Xen platform device.
//! - **0x70/0x71** (CMOS NVRAM): Xen's RTC owns indices 0x00-0x0d and forwards the others.
//!   hvmloader writes the memory size here; SeaBIOS reads 0x5b-0x5d (RAM above 4 GiB, in
//!   64 KiB units, which must read 0 with none), 0x10, 0x32, 0x38 and 0x3d.
//! - **0xb004** (ACPI PM1a_CNT, 2 bytes): not Xen's. SCI_EN reads 1 (hvmloader stops the
//!   domain otherwise); a write with SLP_EN and SLP_TYP 0 is the guest's S5 (poweroff).
//! - **0xafe0** (GPE0 block, 4 bytes): reads 0.
//! - **0x510/0x511**: fw_cfg ([`crate::fwcfg`]).

use crate::fwcfg::{FwCfg, PORT_DATA, PORT_SELECTOR};

/// The configuration address port.
pub const PORT_CF8: u16 = 0xcf8;
/// CMOS index and data.
pub const PORT_CMOS: u16 = 0x70;
/// ACPI PM1a control block (hvmloader's ACPI_PM1A_CNT_BLK_ADDRESS_V1).
pub const PORT_PM1A_CNT: u16 = 0xb004;
/// ACPI GPE0 block (ACPI_GPE0_BLK_ADDRESS_V1, 4 bytes).
pub const PORT_GPE0: u16 = 0xafe0;

/// PM1a_CNT bits.
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;

/// The port ranges this device claims, inclusive.
pub const RANGES: [(u16, u16, &str); 5] = [
    (PORT_CMOS, PORT_CMOS + 1, "CMOS 0x70-0x71"),
    (PORT_CF8, PORT_CF8 + 3, "PCI config address 0xcf8-0xcfb"),
    (PORT_SELECTOR, PORT_DATA, "fw_cfg 0x510-0x511"),
    (PORT_GPE0, PORT_GPE0 + 3, "ACPI GPE0 0xafe0-0xafe3"),
    (
        PORT_PM1A_CNT,
        PORT_PM1A_CNT + 1,
        "ACPI PM1a_CNT 0xb004-0xb005",
    ),
];

/// What the guest asked for that the machine's owner must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// ACPI S5: power off.
    PowerOff,
}

/// The chipset ports.
#[derive(Debug)]
pub struct Chipset {
    cf8: u32,
    cmos_index: u8,
    cmos: [u8; 128],
    pm1_cnt: u16,
    fw: FwCfg,
    requests: Vec<Request>,
}

impl Chipset {
    /// The ports after reset, with `fw` behind 0x510.
    pub fn new(fw: FwCfg) -> Chipset {
        let mut cmos = [0u8; 128];
        cmos[0x32] = 0x20; // century, BCD
        Chipset {
            cf8: 0,
            cmos_index: 0,
            cmos,
            pm1_cnt: SCI_EN,
            fw,
            requests: Vec::new(),
        }
    }

    /// Whether `port` is one of ours.
    pub fn claims(port: u64) -> bool {
        RANGES
            .iter()
            .any(|&(s, e, _)| port >= u64::from(s) && port <= u64::from(e))
    }

    /// What the guest asked for since the last call.
    pub fn take_requests(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.requests)
    }

    /// The fw_cfg device.
    pub fn fw_cfg(&mut self) -> &mut FwCfg {
        &mut self.fw
    }

    /// A read of `size` bytes at `port` (a claimed port); bytes of it past our ports read
    /// all ones.
    pub fn read(&mut self, port: u64, size: u8) -> u64 {
        let mut v = 0u64;
        for i in 0..u64::from(size) {
            v |= u64::from(self.read_byte(port + i)) << (8 * i);
        }
        v
    }

    fn read_byte(&mut self, port: u64) -> u8 {
        let cf8 = u64::from(PORT_CF8);
        match port {
            p if (cf8..cf8 + 4).contains(&p) => (self.cf8 >> (8 * (p - cf8))) as u8,
            0x70 => 0xff, // the index port is write-only
            0x71 => self.cmos[usize::from(self.cmos_index & 0x7f)],
            p if p == u64::from(PORT_DATA) => self.fw.read_byte(),
            p if p == u64::from(PORT_SELECTOR) => 0,
            p if (u64::from(PORT_GPE0)..u64::from(PORT_GPE0) + 4).contains(&p) => 0,
            p if p == u64::from(PORT_PM1A_CNT) => self.pm1_cnt as u8,
            p if p == u64::from(PORT_PM1A_CNT) + 1 => (self.pm1_cnt >> 8) as u8,
            _ => 0xff,
        }
    }

    /// A write of `size` bytes at `port`.
    pub fn write(&mut self, port: u64, size: u8, value: u64) {
        let cf8 = u64::from(PORT_CF8);
        if port == u64::from(PORT_SELECTOR) {
            // The selector is 16 bits wide; a byte write sets its low half.
            let key = if size >= 2 {
                value as u16
            } else {
                value as u8 as u16
            };
            self.fw.select(key);
            return;
        }
        if port == u64::from(PORT_PM1A_CNT) && size >= 2 {
            self.pm1_write(value as u16);
            return;
        }
        for i in 0..u64::from(size) {
            let b = (value >> (8 * i)) as u8;
            match port + i {
                p if (cf8..cf8 + 4).contains(&p) => {
                    let shift = 8 * (p - cf8);
                    self.cf8 = (self.cf8 & !(0xff << shift)) | (u32::from(b) << shift);
                }
                0x70 => self.cmos_index = b & 0x7f,
                0x71 => self.cmos[usize::from(self.cmos_index)] = b,
                p if p == u64::from(PORT_PM1A_CNT) => {
                    self.pm1_write((self.pm1_cnt & 0xff00) | u16::from(b))
                }
                p if p == u64::from(PORT_PM1A_CNT) + 1 => {
                    self.pm1_write((self.pm1_cnt & 0x00ff) | (u16::from(b) << 8))
                }
                _ => {}
            }
        }
    }

    fn pm1_write(&mut self, v: u16) {
        // SCI_EN stays set (the platform has no legacy mode to go back to); SLP_EN is a
        // write-only trigger.
        if v & SLP_EN != 0 && (v >> 10) & 7 == 0 {
            self.requests.push(Request::PowerOff);
        }
        self.pm1_cnt = (v & !SLP_EN) | SCI_EN;
    }

    /// CMOS byte `i` (tests).
    pub fn cmos(&self, i: usize) -> u8 {
        self.cmos[i & 0x7f]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip() -> Chipset {
        Chipset::new(FwCfg::new(1))
    }

    #[test]
    fn test_cf8_reads_back_what_linux_pci_check_type1_writes() {
        let mut c = chip();
        c.write(0xcfb, 1, 0x01);
        assert_eq!(c.read(0xcf8, 4), 0x0100_0000);
        c.write(0xcf8, 4, 0x8000_0000);
        assert_eq!(c.read(0xcf8, 4), 0x8000_0000);
        c.write(0xcf8, 2, 0x1234);
        assert_eq!(c.read(0xcf8, 4), 0x8000_1234);
        assert_eq!(c.read(0xcfa, 2), 0x8000);
    }

    #[test]
    fn test_cmos_above_the_rtc_is_nvram_and_ram_above_4g_reads_zero() {
        let mut c = chip();
        for i in [0x5bu64, 0x5c, 0x5d] {
            c.write(0x70, 1, i);
            assert_eq!(c.read(0x71, 1), 0, "CMOS {i:#x}");
        }
        c.write(0x70, 1, 0x34);
        c.write(0x71, 1, 0xab);
        c.write(0x70, 1, 0x80 | 0x34); // NMI-disable bit set: the same index
        assert_eq!(c.read(0x71, 1), 0xab);
        c.write(0x70, 1, 0x32);
        assert_eq!(c.read(0x71, 1), 0x20);
        assert_eq!(c.read(0x70, 1), 0xff);
    }

    #[test]
    fn test_pm1a_cnt_has_sci_enabled_and_s5_asks_for_poweroff() {
        let mut c = chip();
        assert_eq!(
            c.read(0xb004, 2) & 1,
            1,
            "hvmloader's acpi_enable_sci check"
        );
        c.write(0xb004, 2, 0);
        assert_eq!(c.read(0xb004, 2), 1, "SCI_EN stays");
        assert!(c.take_requests().is_empty());
        c.write(0xb004, 2, u64::from(SLP_EN | (5 << 10))); // S-state 5 would be SLP_TYP 5
        assert!(c.take_requests().is_empty());
        c.write(0xb004, 2, u64::from(SLP_EN)); // the DSDT's _S5: SLP_TYP 0
        assert_eq!(c.take_requests(), vec![Request::PowerOff]);
        assert_eq!(c.read(0xb004, 2) & u64::from(SLP_EN), 0);
        assert_eq!(c.read(0xafe0, 4), 0);
    }

    #[test]
    fn test_fw_cfg_through_the_ports() {
        let mut c = chip();
        c.write(0x510, 2, 0);
        let sig: Vec<u8> = (0..4).map(|_| c.read(0x511, 1) as u8).collect();
        assert_eq!(sig, b"QEMU");
        assert!(Chipset::claims(0x511) && Chipset::claims(0xcfb) && !Chipset::claims(0xcfc));
    }
}
