//! Arbitrary guest RAM under a virtio-blk queue: the descriptor table, the driver ring and
//! every buffer come from the input, and so do the queue size and the disk. devmodel's queue
//! code (the same as its queue thread runs) must never panic, must answer every chain it takes
//! with a used entry for a head inside the queue, and must never claim to have written more
//! than guest RAM holds.
#![no_main]

use std::sync::Arc;

use backends::blk::engine::null::NullEngine;
use devmodel::irq::IrqSink;
use devmodel::virtio::blk::serve_queue_once;
use devmodel::virtio::QueueConfig;
use libfuzzer_sys::fuzz_target;
use xen::{BufIoreq, DeviceModel, DmError, DomId, IoRange, IoServId, IoreqServerInfo, SharedMem};

const RAM: usize = 64 << 10;

struct NoIrq;

impl DeviceModel for NoIrq {
    fn create_ioreq_server(&self, _: DomId, _: BufIoreq) -> Result<IoServId, DmError> {
        Ok(0)
    }
    fn get_ioreq_server_info(
        &self,
        _: DomId,
        _: IoServId,
        _: bool,
    ) -> Result<IoreqServerInfo, DmError> {
        Ok(IoreqServerInfo {
            bufioreq_port: 0,
            ioreq_gfn: 0,
            bufioreq_gfn: 0,
        })
    }
    fn map_io_range(&self, _: DomId, _: IoServId, _: IoRange) -> Result<(), DmError> {
        Ok(())
    }
    fn unmap_io_range(&self, _: DomId, _: IoServId, _: IoRange) -> Result<(), DmError> {
        Ok(())
    }
    fn set_ioreq_server_state(&self, _: DomId, _: IoServId, _: bool) -> Result<(), DmError> {
        Ok(())
    }
    fn destroy_ioreq_server(&self, _: DomId, _: IoServId) -> Result<(), DmError> {
        Ok(())
    }
    fn set_isa_irq_level(&self, _: DomId, _: u8, _: bool) -> Result<(), DmError> {
        Ok(())
    }
    fn set_pci_intx_level(
        &self,
        _: DomId,
        _: u16,
        _: u8,
        _: u8,
        _: u8,
        _: bool,
    ) -> Result<(), DmError> {
        Ok(())
    }
    fn inject_msi(&self, _: DomId, _: u64, _: u32) -> Result<(), DmError> {
        Ok(())
    }
    fn restrict(&self, _: DomId) -> Result<(), DmError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (head, body) = data.split_at(8);
    let size = u16::from_le_bytes([head[0], head[1]]);
    let capacity = u64::from(u32::from_le_bytes([head[2], head[3], head[4], head[5]])) * 512;
    let read_only = head[6] & 1 != 0;
    let ram = Arc::new(SharedMem::anonymous(RAM).unwrap());
    ram.write(0, &body[..body.len().min(RAM)]).unwrap();
    let qc = QueueConfig {
        size,
        enabled: true,
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
    };
    let Ok(engine) = NullEngine::new(capacity.max(512), 64, read_only) else {
        return;
    };
    let irq = IrqSink::new(Arc::new(NoIrq), 1);
    match serve_queue_once(ram, qc, Box::new(engine), irq) {
        // An impossible queue (size 0, not a power of two, above the maximum) is refused.
        Err(_) => {}
        Ok(used) => {
            assert!(size.is_power_of_two() && size <= 256);
            assert!(used.len() <= usize::from(size));
            for (id, len) in used {
                assert!(
                    id < u32::from(size),
                    "used id {id} outside a queue of {size}"
                );
                assert!(len as usize <= RAM + 1, "claimed {len} bytes written");
            }
        }
    }
});
