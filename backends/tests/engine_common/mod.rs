//! Helpers shared by the engine tests (engine_raw, engine_qcow2, engine_blockdev).
#![allow(dead_code)]

use std::sync::Arc;

use backends::blk::engine::{IoMem, IoOp, IoRequest, IoSeg};
use xen::SharedMem;

/// Test memory standing in for mapped guest pages.
pub fn mem(len: usize) -> Arc<SharedMem> {
    Arc::new(SharedMem::anonymous(len).unwrap())
}

/// A segment of `m`.
pub fn seg(m: &Arc<SharedMem>, offset: usize, len: usize, device_writes: bool) -> IoSeg {
    let m: Arc<dyn IoMem> = m.clone();
    IoSeg::new(m, offset, len, device_writes).unwrap()
}

/// A request without FUA.
pub fn req(tag: u64, op: IoOp, offset: u64, segs: Vec<IoSeg>, len: u64) -> IoRequest {
    IoRequest {
        tag,
        op,
        offset,
        len,
        segs,
        fua: false,
    }
}
