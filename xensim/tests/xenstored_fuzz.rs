//! Random requests never crash the server: every request gets a reply of its own type
//! or XS_ERROR, with its ids echoed, and the server keeps serving.

mod xenstored_common;

use proptest::prelude::*;
use xen::abi::xs_wire::msg;
use xenbus::wire::Message;
use xensim::xenstored::{Quotas, Xenstored};
use xenstored_common::Client;

fn word() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"".to_vec()),
        Just(b"/".to_vec()),
        Just(b"/a".to_vec()),
        Just(b"/a/b".to_vec()),
        Just(b"a/b".to_vec()),
        Just(b"@introduceDomain".to_vec()),
        Just(b"@releaseDomain".to_vec()),
        Just(b"/local/domain/".to_vec()),
        Just(b"/local/domain/5".to_vec()),
        Just(b"T".to_vec()),
        Just(b"F".to_vec()),
        Just(b"5".to_vec()),
        Just(b"b0".to_vec()),
        Just(b"r5".to_vec()),
        Just(b"n65536".to_vec()),
        Just(b"print".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

fn request() -> impl Strategy<Value = (u32, u32, Vec<u8>)> {
    let ty = prop_oneof![0u32..24, any::<u32>()];
    let tx = prop_oneof![Just(0u32), 1u32..4, any::<u32>()];
    let payload = proptest::collection::vec(word(), 0..5).prop_map(|ws| {
        let mut p = Vec::new();
        for w in ws {
            p.extend_from_slice(&w);
            p.push(0);
        }
        p
    });
    let trim = any::<bool>();
    (ty, tx, payload, trim).prop_map(|(t, x, mut p, trim)| {
        if trim {
            p.pop();
        }
        (t, x, p)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn prop_random_requests_always_answered(
        reqs in proptest::collection::vec((any::<bool>(), request()), 1..40)
    ) {
        let xs = Xenstored::new(Quotas::default());
        xs.introduce_domain(5);
        xs.create_domain_home(5).unwrap();
        let mut d0 = Client::new(xs.connect_as(0).unwrap());
        let mut g = Client::new(xs.connect_as(5).unwrap());
        let mut g_alive = true;
        for (as_dom0, (t, tx, p)) in reqs {
            if !as_dom0 && !g_alive {
                continue;
            }
            let c = if as_dom0 { &mut d0 } else { &mut g };
            let m = c.raw(t, tx, p.clone());
            prop_assert!(m.type_ == t || m.type_ == msg::XS_ERROR, "type {} -> {}", t, m.type_);
            if t == msg::XS_RELEASE && as_dom0 && m.type_ == t && p.starts_with(b"5") {
                g_alive = false;
            }
        }
        // Still serving, and consistent.
        let mut fresh = Client::new(xs.connect_as(0).unwrap());
        prop_assert!(fresh.read("/tool").is_ok());
        let m = Message::with_strings(msg::XS_DIRECTORY, 9, 0, &[b"/"]);
        let r = fresh.raw(m.type_, 0, m.payload);
        prop_assert_eq!(r.type_, msg::XS_DIRECTORY);
    }
}
