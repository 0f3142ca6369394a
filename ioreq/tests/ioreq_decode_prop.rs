//! Property test of ioreq decoding (the same invariants as the `ioreq_decode` fuzz target):
//! any slot contents decode without panicking, and what is accepted stays inside the port
//! space, the config space and guest RAM.

use ioreq::decode::{decode, Request, MAX_REP_COUNT, PCI_CONFIG_SPACE, PIO_SPACE_END};
use ioreq::IoSpace;
use proptest::prelude::*;
use xen::abi::ioreq::Ioreq;

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..0x2_0000,
        Just(u64::MAX),
        (0u64..64).prop_map(|s| 1u64 << s),
        (0u64..64).prop_map(|s| (1u64 << s).wrapping_sub(1)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]
    #[test]
    fn test_decode_accepts_only_in_bounds_transfers(
        addr in interesting_u64(),
        data in interesting_u64(),
        count in prop_oneof![any::<u32>(), 0u32..5000],
        size in prop_oneof![any::<u32>(), 0u32..10],
        bits in any::<u8>(),
        type_ in prop_oneof![any::<u8>(), 0u8..10],
        ram in prop_oneof![interesting_u64(), Just(16u64 << 20)],
    ) {
        let req = Ioreq { addr, data, count, size, vp_eport: 0, _pad0: 0, bits, type_ };
        if let Ok(Request::Access(t)) = decode(&req, ram) {
            let sz = u64::from(t.size);
            prop_assert!(matches!(t.size, 1 | 2 | 4 | 8));
            prop_assert!(t.count >= 1 && t.count <= MAX_REP_COUNT);
            match t.space {
                IoSpace::Port => prop_assert!(t.size <= 4 && t.addr + sz <= PIO_SPACE_END),
                IoSpace::PciConfig(_) => prop_assert!(t.count == 1 && t.addr + sz <= PCI_CONFIG_SPACE),
                IoSpace::Mmio => {
                    let (a, b) = (t.element_addr(0), t.element_addr(t.count - 1));
                    prop_assert!(a.checked_add(sz).is_some() && b.checked_add(sz).is_some());
                    if t.df { prop_assert!(b <= a); } else { prop_assert!(a <= b); }
                }
            }
            if let (Some(first), Some(last)) = (t.element_buf(0), t.element_buf(t.count - 1)) {
                for gpa in [first, last] {
                    prop_assert!(gpa.checked_add(sz).is_some_and(|end| end <= ram));
                }
            }
        }
    }
}
