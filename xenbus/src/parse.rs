//! Strict parsing of values read from xenstore (THREATS "Rule for domio").
//!
//! Frontend-writable nodes are hostile: a number is plain ASCII decimal digits, no sign, no
//! spaces, no leading zeros (except "0" itself), no NUL, and it must fit the type. Anything
//! else is refused rather than guessed at.

/// Parses a strict decimal `u64`.
pub fn strict_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if v.len() > 1 && v[0] == b'0' {
        return None;
    }
    v.iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Parses a strict decimal `u32`.
pub fn strict_u32(v: &[u8]) -> Option<u32> {
    strict_u64(v).and_then(|n| u32::try_from(n).ok())
}

/// Parses a strict boolean flag: exactly `0` or `1`.
pub fn strict_bool(v: &[u8]) -> Option<bool> {
    match v {
        b"0" => Some(false),
        b"1" => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_strict_u32_canonical_decimal_is_accepted() {
        assert_eq!(strict_u32(b"0"), Some(0));
        assert_eq!(strict_u32(b"51712"), Some(51712));
        assert_eq!(strict_u32(b"4294967295"), Some(u32::MAX));
    }

    #[test]
    fn test_strict_u32_noncanonical_or_overflowing_is_refused() {
        for bad in [
            &b""[..],
            b"00",
            b"01",
            b"-1",
            b"+1",
            b" 1",
            b"1 ",
            b"1\0",
            b"0x10",
            b"4294967296",
            b"99999999999999999999999",
            b"1e3",
        ] {
            assert_eq!(strict_u32(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn test_strict_bool_only_zero_or_one() {
        assert_eq!(strict_bool(b"1"), Some(true));
        assert_eq!(strict_bool(b"0"), Some(false));
        assert_eq!(strict_bool(b"2"), None);
        assert_eq!(strict_bool(b"true"), None);
    }

    proptest! {
        #[test]
        fn prop_strict_u64_roundtrips_display(n: u64) {
            prop_assert_eq!(strict_u64(n.to_string().as_bytes()), Some(n));
        }

        #[test]
        fn prop_strict_u64_never_panics(v in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = strict_u64(&v);
        }
    }
}
