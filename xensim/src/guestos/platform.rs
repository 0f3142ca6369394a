//! The PV drivers' side of the Xen platform device's unplug protocol
//! (docs/misc/hvm-emulated-unplug.pandoc) and its log port.

use super::{bus_err, Result};
use crate::hvm::HvmBus;

/// The magic number.
pub const MAGIC: u16 = 0x49d2;

/// What the handshake found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unplug {
    /// No platform device (the magic did not match).
    Absent,
    /// The drivers are blacklisted: they must not load.
    Blacklisted,
    /// The emulated devices in the mask were unplugged.
    Done {
        /// Protocol version read at 0x12.
        version: u8,
    },
}

/// Runs the handshake: magic, version, product and build numbers, magic again, then the
/// unplug mask.
pub fn unplug<B: HvmBus>(b: &B, product: u16, build: u32, mask: u16) -> Result<Unplug> {
    if b.pio_read(0x10, 2).map_err(bus_err)? as u16 != MAGIC {
        return Ok(Unplug::Absent);
    }
    let version = b.pio_read(0x12, 1).map_err(bus_err)? as u8;
    if version != 0 {
        b.pio_write(0x12, 2, u32::from(product)).map_err(bus_err)?;
        b.pio_write(0x10, 4, build).map_err(bus_err)?;
        if b.pio_read(0x10, 2).map_err(bus_err)? as u16 != MAGIC {
            return Ok(Unplug::Blacklisted);
        }
    }
    b.pio_write(0x10, 2, u32::from(mask)).map_err(bus_err)?;
    Ok(Unplug::Done { version })
}

/// Writes a log line through port 0x12.
pub fn log<B: HvmBus>(b: &B, line: &str) -> Result<()> {
    for &c in line.as_bytes() {
        b.pio_write(0x12, 1, u32::from(c)).map_err(bus_err)?;
    }
    b.pio_write(0x12, 1, u32::from(b'\n')).map_err(bus_err)
}
