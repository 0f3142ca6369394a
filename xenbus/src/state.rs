//! `enum xenbus_state` (xen/io/xenbus.h): the state each end of a PV device publishes in its
//! `state` node.
//!
//! The frontend's `state` node is guest-writable, so parsing is strict: exactly one ASCII
//! digit `0`..=`8`, nothing else (no sign, no spaces, no leading zeros, no NUL).

use std::fmt;

/// The state of one end of a XenBus device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum XenbusState {
    /// 0: the node is missing or unreadable.
    Unknown = 0,
    /// 1: the device is being set up.
    Initialising = 1,
    /// 2: waiting for information from the other end (a backend advertised its features).
    InitWait = 2,
    /// 3: the frontend published its ring details.
    Initialised = 3,
    /// 4: connected.
    Connected = 4,
    /// 5: the device is being closed.
    Closing = 5,
    /// 6: closed.
    Closed = 6,
    /// 7: a reconfiguration was requested.
    Reconfiguring = 7,
    /// 8: the reconfiguration is done.
    Reconfigured = 8,
}

/// A `state` value that is not a XenBus state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid XenBus state {value:?} (expected one digit 0-8)")]
pub struct InvalidState {
    /// The offending value, escaped and truncated to 32 bytes for logs.
    pub value: String,
}

impl XenbusState {
    /// All states, in numeric order.
    pub const ALL: [XenbusState; 9] = [
        XenbusState::Unknown,
        XenbusState::Initialising,
        XenbusState::InitWait,
        XenbusState::Initialised,
        XenbusState::Connected,
        XenbusState::Closing,
        XenbusState::Closed,
        XenbusState::Reconfiguring,
        XenbusState::Reconfigured,
    ];

    /// Parses a `state` node's value strictly.
    pub fn parse(value: &[u8]) -> Result<XenbusState, InvalidState> {
        match value {
            [d @ b'0'..=b'8'] => Ok(XenbusState::ALL[usize::from(d - b'0')]),
            _ => Err(InvalidState {
                value: escape_for_log(value, 32),
            }),
        }
    }

    /// The numeric value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The value written to a `state` node ("1", "4", ...).
    pub fn as_str(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }

    /// The state from its number.
    pub fn from_u8(n: u8) -> Option<XenbusState> {
        XenbusState::ALL.get(usize::from(n)).copied()
    }
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            XenbusState::Unknown => "Unknown",
            XenbusState::Initialising => "Initialising",
            XenbusState::InitWait => "InitWait",
            XenbusState::Initialised => "Initialised",
            XenbusState::Connected => "Connected",
            XenbusState::Closing => "Closing",
            XenbusState::Closed => "Closed",
            XenbusState::Reconfiguring => "Reconfiguring",
            XenbusState::Reconfigured => "Reconfigured",
        };
        write!(f, "{name}({})", *self as u8)
    }
}

/// Renders untrusted bytes for a log line or an error message: printable ASCII as is,
/// everything else escaped, at most `max` input bytes (then `...`).
pub fn escape_for_log(value: &[u8], max: usize) -> String {
    let mut s = String::with_capacity(value.len().min(max) + 3);
    for &b in value.iter().take(max) {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    if value.len() > max {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_state_parse_each_digit_roundtrips() {
        for s in XenbusState::ALL {
            assert_eq!(XenbusState::parse(s.as_str().as_bytes()), Ok(s));
            assert_eq!(XenbusState::from_u8(s.as_u8()), Some(s));
        }
    }

    #[test]
    fn test_state_parse_lenient_forms_are_rejected() {
        for bad in [
            &b""[..],
            b"9",
            b"04",
            b" 4",
            b"4 ",
            b"4\n",
            b"4\0",
            b"+4",
            b"-1",
            b"44",
            b"Connected",
            b"\xff",
        ] {
            assert!(XenbusState::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn test_escape_for_log_non_printable_is_escaped_and_truncated() {
        assert_eq!(escape_for_log(b"a\nb\\", 10), "a\\x0ab\\x5c");
        assert_eq!(escape_for_log(b"abcdef", 3), "abc...");
    }

    proptest! {
        #[test]
        fn prop_state_parse_never_panics_and_accepts_only_one_digit(v in proptest::collection::vec(any::<u8>(), 0..8)) {
            let r = XenbusState::parse(&v);
            prop_assert_eq!(r.is_ok(), v.len() == 1 && (b'0'..=b'8').contains(&v[0]));
        }
    }
}
