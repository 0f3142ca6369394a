//! The xenstore wire format (xen/io/xs_wire.h and docs/misc/xenstore.txt), shared by the
//! client in this crate and by xensim's xenstored.
//!
//! A message is a 16-byte [`XsdSockmsg`] header followed by `len` bytes of payload. Payloads
//! are NUL-separated strings; most requests end with a NUL, and replies to XS_READ do not.
//! Lengths above [`XENSTORE_PAYLOAD_MAX`] are refused before anything is allocated (XSA-72).

use std::io::{self, Read};

pub use xen::abi::xs_wire::msg;
use xen::abi::xs_wire::{XsdSockmsg, XENSTORE_PAYLOAD_MAX, XSD_SOCKMSG_SIZE};
use zerocopy::{FromBytes, IntoBytes};

/// Errors in the wire format.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The header announces a payload longer than the protocol allows.
    #[error("xenstore message type {type_} announces {len} bytes of payload (max {XENSTORE_PAYLOAD_MAX})")]
    TooLong {
        /// Message type.
        type_: u32,
        /// Announced length.
        len: u32,
    },
    /// A payload to send is longer than the protocol allows.
    #[error("xenstore {op} payload of {len} bytes exceeds {XENSTORE_PAYLOAD_MAX}")]
    PayloadTooLong {
        /// Message type name.
        op: &'static str,
        /// Payload length.
        len: usize,
    },
    /// The connection closed (cleanly between messages, or in the middle of one).
    #[error("xenstore connection closed{}", if *.mid_message { " in the middle of a message" } else { "" })]
    Closed {
        /// Whether part of a message had been read.
        mid_message: bool,
    },
    /// A read or write failed.
    #[error("xenstore connection I/O: {0}")]
    Io(#[from] io::Error),
    /// A payload is not in the format its type requires.
    #[error("malformed xenstore {op} payload: {why}")]
    Malformed {
        /// Message type name.
        op: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message type (`msg::XS_*`).
    pub type_: u32,
    /// Request id, echoed in the reply.
    pub req_id: u32,
    /// Transaction id.
    pub tx_id: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// The name of a message type, for logs and errors.
pub fn type_name(t: u32) -> &'static str {
    match t {
        msg::XS_CONTROL => "CONTROL",
        msg::XS_DIRECTORY => "DIRECTORY",
        msg::XS_READ => "READ",
        msg::XS_GET_PERMS => "GET_PERMS",
        msg::XS_WATCH => "WATCH",
        msg::XS_UNWATCH => "UNWATCH",
        msg::XS_TRANSACTION_START => "TRANSACTION_START",
        msg::XS_TRANSACTION_END => "TRANSACTION_END",
        msg::XS_INTRODUCE => "INTRODUCE",
        msg::XS_RELEASE => "RELEASE",
        msg::XS_GET_DOMAIN_PATH => "GET_DOMAIN_PATH",
        msg::XS_WRITE => "WRITE",
        msg::XS_MKDIR => "MKDIR",
        msg::XS_RM => "RM",
        msg::XS_SET_PERMS => "SET_PERMS",
        msg::XS_WATCH_EVENT => "WATCH_EVENT",
        msg::XS_ERROR => "ERROR",
        msg::XS_IS_DOMAIN_INTRODUCED => "IS_DOMAIN_INTRODUCED",
        msg::XS_RESUME => "RESUME",
        msg::XS_SET_TARGET => "SET_TARGET",
        msg::XS_RESET_WATCHES => "RESET_WATCHES",
        msg::XS_DIRECTORY_PART => "DIRECTORY_PART",
        _ => "UNKNOWN",
    }
}

impl Message {
    /// A message whose payload is `parts`, each followed by a NUL.
    pub fn with_strings(type_: u32, req_id: u32, tx_id: u32, parts: &[&[u8]]) -> Self {
        let mut payload = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for p in parts {
            payload.extend_from_slice(p);
            payload.push(0);
        }
        Message {
            type_,
            req_id,
            tx_id,
            payload,
        }
    }

    /// Appends the encoded message (header and payload) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        if self.payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(WireError::PayloadTooLong {
                op: type_name(self.type_),
                len: self.payload.len(),
            });
        }
        let hdr = XsdSockmsg {
            type_: self.type_,
            req_id: self.req_id,
            tx_id: self.tx_id,
            len: self.payload.len() as u32,
        };
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// The encoded message.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut v = Vec::with_capacity(XSD_SOCKMSG_SIZE + self.payload.len());
        self.encode_into(&mut v)?;
        Ok(v)
    }

    /// Reads exactly one message; refuses oversized lengths before allocating.
    pub fn read_from(r: &mut impl Read) -> Result<Message, WireError> {
        let mut hdr_buf = [0u8; XSD_SOCKMSG_SIZE];
        read_full(r, &mut hdr_buf, false)?;
        let hdr = XsdSockmsg::read_from_bytes(&hdr_buf).map_err(|_| WireError::Malformed {
            op: "header",
            why: "short header",
        })?;
        if hdr.len as usize > XENSTORE_PAYLOAD_MAX {
            return Err(WireError::TooLong {
                type_: hdr.type_,
                len: hdr.len,
            });
        }
        let mut payload = vec![0u8; hdr.len as usize];
        read_full(r, &mut payload, true)?;
        Ok(Message {
            type_: hdr.type_,
            req_id: hdr.req_id,
            tx_id: hdr.tx_id,
            payload,
        })
    }

    /// The payload split at NULs, without a trailing empty element (so "a\0b\0" gives
    /// `["a", "b"]` and "a" gives `["a"]`).
    pub fn strings(&self) -> Vec<&[u8]> {
        split_nul(&self.payload)
    }

    /// The payload as one string without its trailing NUL, if it is UTF-8.
    pub fn string(&self) -> Result<&str, WireError> {
        let p = self.payload.strip_suffix(&[0]).unwrap_or(&self.payload);
        std::str::from_utf8(p).map_err(|_| WireError::Malformed {
            op: type_name(self.type_),
            why: "not UTF-8",
        })
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8], mid_message: bool) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(WireError::Closed {
                    mid_message: mid_message || got > 0,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

/// Splits a payload at NULs; a trailing NUL does not make an empty last element.
pub fn split_nul(p: &[u8]) -> Vec<&[u8]> {
    if p.is_empty() {
        return Vec::new();
    }
    let p = p.strip_suffix(&[0]).unwrap_or(p);
    p.split(|b| *b == 0).collect()
}

/// Incremental decoder for a byte stream (for non-blocking readers and ring transports).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// A new, empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not yet form a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next whole message, if there is one. An oversized header is an error and
    /// the stream can no longer be trusted.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if self.buf.len() < XSD_SOCKMSG_SIZE {
            return Ok(None);
        }
        let hdr = XsdSockmsg::read_from_bytes(&self.buf[..XSD_SOCKMSG_SIZE]).map_err(|_| {
            WireError::Malformed {
                op: "header",
                why: "short header",
            }
        })?;
        if hdr.len as usize > XENSTORE_PAYLOAD_MAX {
            return Err(WireError::TooLong {
                type_: hdr.type_,
                len: hdr.len,
            });
        }
        let total = XSD_SOCKMSG_SIZE + hdr.len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let payload = self.buf[XSD_SOCKMSG_SIZE..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Message {
            type_: hdr.type_,
            req_id: hdr.req_id,
            tx_id: hdr.tx_id,
            payload,
        }))
    }
}

/// Access a permission grants (`n`, `r`, `w`, `b` in docs/misc/xenstore.txt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermKind {
    /// `n`: no access.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: both.
    Both,
}

/// One permission entry. The first entry of a node's list names its owner and the access
/// everyone else gets; the following entries are per-domain exceptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    /// The access granted.
    pub kind: PermKind,
    /// The domain.
    pub domid: u32,
}

impl Perm {
    /// Parses one entry such as `r5` or `n0`.
    pub fn parse(s: &[u8]) -> Result<Perm, WireError> {
        let bad = WireError::Malformed {
            op: "permissions",
            why: "entry is not [nrwb]<domid>",
        };
        let (&k, rest) = s.split_first().ok_or(WireError::Malformed {
            op: "permissions",
            why: "empty entry",
        })?;
        let kind = match k {
            b'n' => PermKind::None,
            b'r' => PermKind::Read,
            b'w' => PermKind::Write,
            b'b' => PermKind::Both,
            _ => return Err(bad),
        };
        if rest.is_empty() || rest.len() > 5 || !rest.iter().all(u8::is_ascii_digit) {
            return Err(bad);
        }
        let domid: u32 = std::str::from_utf8(rest)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(bad)?;
        if domid > u32::from(u16::MAX) {
            return Err(WireError::Malformed {
                op: "permissions",
                why: "domid out of range",
            });
        }
        Ok(Perm { kind, domid })
    }

    /// The wire form, e.g. `r5`.
    pub fn to_wire(&self) -> String {
        let k = match self.kind {
            PermKind::None => 'n',
            PermKind::Read => 'r',
            PermKind::Write => 'w',
            PermKind::Both => 'b',
        };
        format!("{k}{}", self.domid)
    }

    /// Parses a NUL-separated list (the payload of GET_PERMS replies and SET_PERMS after the
    /// path).
    pub fn parse_list<'a>(
        parts: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<Perm>, WireError> {
        let v: Vec<Perm> = parts
            .into_iter()
            .map(Perm::parse)
            .collect::<Result<_, _>>()?;
        if v.is_empty() {
            return Err(WireError::Malformed {
                op: "permissions",
                why: "empty list",
            });
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_decode_header_len_ffffffff_is_refused_before_alloc() {
        // XSA-72: a 4 GiB length must not be trusted.
        let hdr = XsdSockmsg {
            type_: msg::XS_READ,
            req_id: 1,
            tx_id: 0,
            len: 0xffff_ffff,
        };
        let mut d = Decoder::new();
        d.push(hdr.as_bytes());
        assert!(matches!(
            d.next_message(),
            Err(WireError::TooLong {
                len: 0xffff_ffff,
                ..
            })
        ));
        let mut r = hdr.as_bytes();
        assert!(matches!(
            Message::read_from(&mut r),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn test_encode_payload_over_4096_is_refused() {
        let m = Message {
            type_: msg::XS_WRITE,
            req_id: 0,
            tx_id: 0,
            payload: vec![b'a'; 4097],
        };
        assert!(matches!(
            m.encode(),
            Err(WireError::PayloadTooLong { len: 4097, .. })
        ));
    }

    #[test]
    fn test_split_nul_keeps_inner_empty_strings() {
        assert_eq!(split_nul(b"a\0\0b\0"), vec![&b"a"[..], b"", b"b"]);
        assert_eq!(split_nul(b"value"), vec![&b"value"[..]]);
        assert!(split_nul(b"").is_empty());
    }

    #[test]
    fn test_perm_parse_roundtrip_and_rejects() {
        let p = Perm::parse(b"b65535").unwrap();
        assert_eq!(
            p,
            Perm {
                kind: PermKind::Both,
                domid: 65535
            }
        );
        assert_eq!(p.to_wire(), "b65535");
        for bad in [&b""[..], b"x1", b"r", b"r-1", b"r65536", b"r123456", b"r1a"] {
            assert!(Perm::parse(bad).is_err(), "{:?}", bad);
        }
    }

    proptest! {
        #[test]
        fn prop_decoder_roundtrips_any_split(t in 0u32..30, id: u32, tx: u32,
                                             payload in proptest::collection::vec(any::<u8>(), 0..4096),
                                             cut in 0usize..5000) {
            let m = Message { type_: t, req_id: id, tx_id: tx, payload };
            let bytes = m.encode().unwrap();
            let cut = cut.min(bytes.len());
            let mut d = Decoder::new();
            d.push(&bytes[..cut]);
            let first = d.next_message().unwrap();
            if cut < bytes.len() {
                prop_assert!(first.is_none());
                d.push(&bytes[cut..]);
                prop_assert_eq!(d.next_message().unwrap(), Some(m));
            } else {
                prop_assert_eq!(first, Some(m));
            }
            prop_assert_eq!(d.buffered(), 0);
        }
    }
}
