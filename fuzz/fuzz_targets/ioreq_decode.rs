//! Fuzzes ioreq decoding: any 32 bytes a hostile party puts in an ioreq slot, against any
//! guest RAM size, must decode without panicking, and whatever is accepted must stay inside
//! the port space, the config space and guest RAM.
#![no_main]

use ioreq::decode::{decode, Request, MAX_REP_COUNT, PCI_CONFIG_SPACE, PIO_SPACE_END};
use ioreq::IoSpace;
use libfuzzer_sys::fuzz_target;
use xen::abi::ioreq::Ioreq;
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let Ok((req, rest)) = Ioreq::read_from_prefix(data) else {
        return;
    };
    let mut ram = [0u8; 8];
    let n = rest.len().min(8);
    ram[..n].copy_from_slice(&rest[..n]);
    let ram = u64::from_le_bytes(ram);
    let Ok(Request::Access(t)) = decode(&req, ram) else {
        return;
    };
    let size = u64::from(t.size);
    assert!(matches!(t.size, 1 | 2 | 4 | 8));
    assert!(t.count >= 1 && t.count <= MAX_REP_COUNT);
    match t.space {
        IoSpace::Port => assert!(t.size <= 4 && t.addr + size <= PIO_SPACE_END),
        IoSpace::PciConfig(_) => assert!(t.count == 1 && t.addr + size <= PCI_CONFIG_SPACE),
        IoSpace::Mmio => {
            let (a, b) = (t.element_addr(0), t.element_addr(t.count - 1));
            assert!(a.checked_add(size).is_some() && b.checked_add(size).is_some());
        }
    }
    if let (Some(first), Some(last)) = (t.element_buf(0), t.element_buf(t.count - 1)) {
        for gpa in [first, last] {
            assert!(gpa.checked_add(size).is_some_and(|end| end <= ram));
        }
    }
});
