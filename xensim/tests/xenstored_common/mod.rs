//! A minimal test-only xenstore client over the raw codec (`xenbus::wire`).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use xen::abi::xs_wire::msg;
use xenbus::wire::{split_nul, Message, WireError};

/// Outcome of a request: the reply payload, or the XS_ERROR name.
pub type XsResult = Result<Vec<u8>, String>;

/// A watch event: (path, token).
pub type Event = (String, String);

pub struct Client {
    pub s: UnixStream,
    next_id: u32,
    pub events: VecDeque<Event>,
}

pub const TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    pub fn new(s: UnixStream) -> Self {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        Client {
            s,
            next_id: 1,
            events: VecDeque::new(),
        }
    }

    pub fn send(&mut self, m: &Message) {
        self.s.write_all(&m.encode().unwrap()).unwrap();
    }

    /// Reads one message (reply or event) from the server.
    pub fn recv(&mut self) -> Result<Message, WireError> {
        Message::read_from(&mut self.s)
    }

    fn push_event(&mut self, m: &Message) {
        let v = split_nul(&m.payload);
        self.events.push_back((
            String::from_utf8_lossy(v.first().copied().unwrap_or(b"")).into_owned(),
            String::from_utf8_lossy(v.get(1).copied().unwrap_or(b"")).into_owned(),
        ));
    }

    /// Sends a request and waits for its reply, buffering events that arrive first.
    pub fn raw(&mut self, type_: u32, tx_id: u32, payload: Vec<u8>) -> Message {
        let req_id = self.next_id;
        self.next_id += 1;
        self.send(&Message {
            type_,
            req_id,
            tx_id,
            payload,
        });
        loop {
            let m = self.recv().expect("reply");
            if m.type_ == msg::XS_WATCH_EVENT {
                self.push_event(&m);
                continue;
            }
            assert_eq!(m.req_id, req_id, "reply echoes req_id");
            assert_eq!(m.tx_id, tx_id, "reply echoes tx_id");
            return m;
        }
    }

    pub fn req(&mut self, type_: u32, tx_id: u32, parts: &[&[u8]]) -> XsResult {
        let m = Message::with_strings(type_, 0, 0, parts);
        self.req_payload(type_, tx_id, m.payload)
    }

    pub fn req_payload(&mut self, type_: u32, tx_id: u32, payload: Vec<u8>) -> XsResult {
        let m = self.raw(type_, tx_id, payload);
        if m.type_ == msg::XS_ERROR {
            let s = m.string().unwrap_or("?").to_owned();
            return Err(s);
        }
        assert_eq!(m.type_, type_, "reply type");
        Ok(m.payload)
    }

    pub fn read(&mut self, path: &str) -> XsResult {
        self.read_tx(0, path)
    }
    pub fn read_tx(&mut self, tx: u32, path: &str) -> XsResult {
        self.req(msg::XS_READ, tx, &[path.as_bytes()])
    }
    pub fn write(&mut self, path: &str, value: &[u8]) -> XsResult {
        self.write_tx(0, path, value)
    }
    pub fn write_tx(&mut self, tx: u32, path: &str, value: &[u8]) -> XsResult {
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        p.extend_from_slice(value);
        self.req_payload(msg::XS_WRITE, tx, p)
    }
    pub fn mkdir(&mut self, path: &str) -> XsResult {
        self.req(msg::XS_MKDIR, 0, &[path.as_bytes()])
    }
    pub fn rm(&mut self, path: &str) -> XsResult {
        self.rm_tx(0, path)
    }
    pub fn rm_tx(&mut self, tx: u32, path: &str) -> XsResult {
        self.req(msg::XS_RM, tx, &[path.as_bytes()])
    }
    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, String> {
        self.directory_tx(0, path)
    }
    pub fn directory_tx(&mut self, tx: u32, path: &str) -> Result<Vec<String>, String> {
        let p = self.req(msg::XS_DIRECTORY, tx, &[path.as_bytes()])?;
        Ok(split_nul(&p)
            .into_iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect())
    }
    pub fn get_perms(&mut self, path: &str) -> Result<Vec<String>, String> {
        let p = self.req(msg::XS_GET_PERMS, 0, &[path.as_bytes()])?;
        Ok(split_nul(&p)
            .into_iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect())
    }
    pub fn set_perms(&mut self, path: &str, perms: &[&str]) -> XsResult {
        let mut parts: Vec<&[u8]> = vec![path.as_bytes()];
        parts.extend(perms.iter().map(|p| p.as_bytes()));
        self.req(msg::XS_SET_PERMS, 0, &parts)
    }
    pub fn watch(&mut self, path: &str, token: &str) -> XsResult {
        self.req(msg::XS_WATCH, 0, &[path.as_bytes(), token.as_bytes()])
    }
    pub fn unwatch(&mut self, path: &str, token: &str) -> XsResult {
        self.req(msg::XS_UNWATCH, 0, &[path.as_bytes(), token.as_bytes()])
    }
    pub fn tx_start(&mut self) -> Result<u32, String> {
        let p = self.req(msg::XS_TRANSACTION_START, 0, &[b""])?;
        let s = std::str::from_utf8(p.strip_suffix(&[0]).unwrap()).unwrap();
        Ok(s.parse().unwrap())
    }
    pub fn tx_end(&mut self, tx: u32, commit: bool) -> XsResult {
        self.req(
            msg::XS_TRANSACTION_END,
            tx,
            &[if commit { b"T" } else { b"F" }],
        )
    }

    /// The next watch event, waiting for it if needed.
    pub fn next_event(&mut self) -> Event {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        let m = self.recv().expect("watch event");
        assert_eq!(
            m.type_,
            msg::XS_WATCH_EVENT,
            "unexpected message while waiting for an event: {m:?}"
        );
        self.push_event(&m);
        self.events.pop_front().unwrap()
    }

    /// A round trip: every event queued for us before it has arrived when it returns.
    pub fn sync(&mut self) {
        self.req(msg::XS_GET_DOMAIN_PATH, 0, &[b"0"]).unwrap();
    }

    /// All events received up to a round trip.
    pub fn drain_events(&mut self) -> Vec<Event> {
        self.sync();
        self.events.drain(..).collect()
    }
}

pub fn ev(path: &str, token: &str) -> Event {
    (path.to_owned(), token.to_owned())
}
