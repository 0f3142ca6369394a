//! Interrupt delivery through device-model operations (set_isa_irq_level,
//! set_pci_intx_level, inject_msi). Failures are logged at a rate limit: an interrupt that
//! Xen refuses is lost, as a wire that is not connected would lose it.

use std::sync::Arc;

use xen::{DeviceModel, DomId};

use crate::pci::MsiMessage;
use crate::RateLog;

/// A cloneable handle that raises interrupts in one domain.
#[derive(Clone)]
pub struct IrqSink {
    dm: Arc<dyn DeviceModel>,
    domid: DomId,
    log: Arc<RateLog>,
}

impl std::fmt::Debug for IrqSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqSink")
            .field("domid", &self.domid)
            .finish()
    }
}

impl IrqSink {
    /// Interrupts for `domid` through `dm`.
    pub fn new(dm: Arc<dyn DeviceModel>, domid: DomId) -> IrqSink {
        IrqSink {
            dm,
            domid,
            log: Arc::new(RateLog::new()),
        }
    }

    /// The domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Sets an ISA IRQ line's level.
    pub fn isa(&self, irq: u8, level: bool) {
        if let Err(e) = self.dm.set_isa_irq_level(self.domid, irq, level) {
            self.log.warn(format_args!(
                "dom{}: ISA IRQ {irq} level {level}: {e}",
                self.domid
            ));
        }
    }

    /// Sets a PCI INTx line's level.
    pub fn intx(&self, bus: u8, dev: u8, intx: u8, level: bool) {
        if let Err(e) = self
            .dm
            .set_pci_intx_level(self.domid, 0, bus, dev, intx, level)
        {
            self.log.warn(format_args!(
                "dom{}: INTx {bus:02x}:{dev:02x} #{intx} level {level}: {e}",
                self.domid
            ));
        }
    }

    /// Sends an MSI.
    pub fn msi(&self, m: MsiMessage) {
        if let Err(e) = self.dm.inject_msi(self.domid, m.addr, m.data) {
            self.log.warn(format_args!(
                "dom{}: MSI {:#x}/{:#x}: {e}",
                self.domid, m.addr, m.data
            ));
        }
    }
}
