//! Property test of the virtio-blk queue code over arbitrary guest RAM (the same harness as
//! the `virtio_desc_chain` fuzz target): no panic, a used entry for every chain taken, heads
//! inside the queue, and refusal of impossible queue sizes (XSA-211).

mod common;

use std::sync::Arc;

use backends::blk::engine::null::NullEngine;
use devmodel::irq::IrqSink;
use devmodel::virtio::blk::serve_queue_once;
use devmodel::virtio::QueueConfig;
use proptest::prelude::*;
use xen::SharedMem;

const RAM: usize = 64 << 10;

fn run(size: u16, body: &[u8], capacity: u64, read_only: bool) -> Result<Vec<(u32, u32)>, String> {
    let ram = Arc::new(SharedMem::anonymous(RAM).unwrap());
    ram.write(0, body).unwrap();
    let qc = QueueConfig {
        size,
        enabled: true,
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
    };
    let engine = NullEngine::new(capacity, 64, read_only).unwrap();
    let irqs = Arc::new(common::Irqs::default());
    serve_queue_once(
        ram,
        qc,
        Box::new(engine),
        IrqSink::new(Arc::new(common::RecordingDm(irqs)), 1),
    )
    .map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_rings_never_panic_and_heads_stay_in_the_queue(
        size_log in 0u32..10,
        avail_idx in 0u16..600,
        desc in proptest::collection::vec(any::<u8>(), 4096),
        ring in proptest::collection::vec(any::<u16>(), 256),
        data in proptest::collection::vec(any::<u8>(), 512),
        read_only in any::<bool>(),
    ) {
        let size = 1u16 << size_log;
        let mut body = vec![0u8; 0x3000];
        body[..4096].copy_from_slice(&desc);
        body[0x1002..0x1004].copy_from_slice(&avail_idx.to_le_bytes());
        for (i, h) in ring.iter().enumerate() {
            body[0x1004 + 2 * i..0x1006 + 2 * i].copy_from_slice(&(h % (size * 2).max(1)).to_le_bytes());
        }
        body.extend_from_slice(&data);
        match run(size, &body, 1 << 20, read_only) {
            Err(e) => prop_assert!(size > 256, "refused a valid queue of {size}: {e}"),
            Ok(used) => {
                prop_assert!(size <= 256);
                // A driver ring index more than the queue size ahead is refused as a whole; a
                // head outside the table breaks the ring: the queue stops there (and the
                // device needs a reset), so only the chains before it get used entries.
                let heads = ring.iter().map(|h| h % (size * 2).max(1));
                let expect = if avail_idx <= size {
                    heads.take(usize::from(avail_idx)).take_while(|h| *h < size).count()
                } else {
                    0
                };
                prop_assert_eq!(used.len(), expect);
                for (id, len) in used {
                    prop_assert!(id < u32::from(size));
                    prop_assert!(len as usize <= RAM + 1);
                }
            }
        }
    }
}

#[test]
fn xsa_211_impossible_queue_sizes_are_refused() {
    for size in [0u16, 3, 100, 512, 0xffff] {
        assert!(run(size, &[], 1 << 20, false).is_err(), "size {size}");
    }
}
