//! A 16550A driver: 8N1 at a divisor, FIFOs on, polled transmit, received-data interrupts.

use std::time::{Duration, Instant};

use super::{bus_err, GuestOsError, Result};
use crate::hvm::{HvmBus, Irq};

/// A UART at `base` raising ISA IRQ `irq`.
#[derive(Debug, Clone, Copy)]
pub struct Uart {
    /// I/O base.
    pub base: u16,
    /// ISA IRQ.
    pub irq: u8,
}

impl Uart {
    /// COM1.
    pub const COM1: Uart = Uart {
        base: 0x3f8,
        irq: 4,
    };

    /// Programs 115200 8N1 (divisor 1), FIFOs on with a 1-byte trigger, DTR/RTS/OUT2 on,
    /// and the received-data interrupt enabled.
    pub fn init<B: HvmBus>(&self, b: &B) -> Result<()> {
        let p = |off: u16, v: u8| {
            b.pio_write(self.base + off, 1, u32::from(v))
                .map_err(bus_err)
        };
        p(1, 0)?;
        p(3, 0x80)?;
        p(0, 1)?;
        p(1, 0)?;
        p(3, 0x03)?;
        p(2, 0x07)?;
        p(4, 0x0b)?;
        p(1, 0x01)?;
        Ok(())
    }

    /// Reads a register.
    pub fn reg<B: HvmBus>(&self, b: &B, off: u16) -> Result<u8> {
        Ok(b.pio_read(self.base + off, 1).map_err(bus_err)? as u8)
    }

    /// Sends bytes, waiting for THRE before each.
    pub fn write<B: HvmBus>(&self, b: &B, data: &[u8]) -> Result<()> {
        for &c in data {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.reg(b, 5)? & 0x20 == 0 {
                if Instant::now() > deadline {
                    return Err(GuestOsError::Timeout("UART THRE".into()));
                }
            }
            b.pio_write(self.base, 1, u32::from(c)).map_err(bus_err)?;
        }
        Ok(())
    }

    /// Waits for the UART's IRQ to be asserted, then drains the receive FIFO into `out`
    /// until `want` bytes arrived. Returns the number of interrupts seen.
    pub fn read_irq<B: HvmBus>(
        &self,
        b: &B,
        out: &mut Vec<u8>,
        want: usize,
        timeout: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut irqs = 0;
        while out.len() < want {
            let now = Instant::now();
            if now >= deadline {
                return Err(GuestOsError::Timeout(format!(
                    "UART input ({} of {want} bytes)",
                    out.len()
                )));
            }
            if !b.wait_irq(deadline - now) {
                continue;
            }
            let raised = b
                .take_irqs()
                .iter()
                .any(|i| matches!(i, Irq::Isa { irq, level: true } if *irq == self.irq));
            if !raised {
                continue;
            }
            irqs += 1;
            // Interrupt handler: IIR says why; drain while LSR.DR.
            let iir = self.reg(b, 2)?;
            if iir & 1 != 0 {
                continue;
            }
            while self.reg(b, 5)? & 1 != 0 {
                out.push(self.reg(b, 0)?);
            }
        }
        Ok(irqs)
    }
}
