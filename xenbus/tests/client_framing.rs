//! The client's framing, multiplexing and failure handling, against a tiny scripted server
//! on a `UnixStream::pair()`. (Behaviour against a real xenstored is in `client_xensim.rs`.)

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use xen::abi::xs_wire::{msg, XsdSockmsg};
use xenbus::client::ClientOptions;
use xenbus::wire::{split_nul, Message};
use xenbus::{XsClient, XsError, XsOps};
use zerocopy::IntoBytes;

const WAIT: Duration = Duration::from_secs(10);

/// Runs `handler` for each request until it returns false or the client goes away.
fn fake_server<F>(opts: ClientOptions, mut handler: F) -> (XsClient, JoinHandle<()>)
where
    F: FnMut(Message, &mut UnixStream) -> bool + Send + 'static,
{
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let client = XsClient::with_options(
        xen::XsStream {
            file: std::fs::File::from(std::os::fd::OwnedFd::from(ours)),
            describe: "fake".to_owned(),
        },
        opts,
    )
    .unwrap();
    let h = std::thread::spawn(move || {
        while let Ok(m) = Message::read_from(&mut theirs) {
            if !handler(m, &mut theirs) {
                break;
            }
        }
    });
    (client, h)
}

fn reply(s: &mut UnixStream, req: &Message, type_: u32, payload: &[u8]) {
    let m = Message {
        type_,
        req_id: req.req_id,
        tx_id: req.tx_id,
        payload: payload.to_vec(),
    };
    s.write_all(&m.encode().unwrap()).unwrap();
}

fn first_string(m: &Message) -> String {
    String::from_utf8(split_nul(&m.payload)[0].to_vec()).unwrap()
}

#[test]
fn test_client_replies_out_of_order_reach_their_callers() {
    // Arrange: the server holds 8 requests, then answers them in reverse order, each with
    // the path it was asked for.
    let (client, _h) = fake_server(ClientOptions::default(), {
        let mut held = Vec::new();
        move |m, s| {
            held.push(m);
            if held.len() == 8 {
                for r in held.drain(..).rev() {
                    let p = first_string(&r);
                    reply(s, &r, msg::XS_READ, p.as_bytes());
                }
            }
            true
        }
    });
    let barrier = Arc::new(Barrier::new(8));
    // Act
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let c = client.clone();
            let b = Arc::clone(&barrier);
            std::thread::spawn(move || {
                b.wait();
                c.read(&format!("/t/{i}")).unwrap()
            })
        })
        .collect();
    // Assert
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), format!("/t/{i}").into_bytes());
    }
}

#[test]
fn test_client_many_threads_many_requests_all_answered_correctly() {
    let (client, _h) = fake_server(ClientOptions::default(), |m, s| {
        let p = first_string(&m);
        reply(s, &m, msg::XS_READ, p.as_bytes());
        true
    });
    let handles: Vec<_> = (0..16)
        .map(|t| {
            let c = client.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let p = format!("/t/{t}/{i}");
                    assert_eq!(c.read(&p).unwrap(), p.as_bytes());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn test_client_error_reply_names_errno_operation_and_path() {
    let (client, _h) = fake_server(ClientOptions::default(), |m, s| {
        reply(s, &m, msg::XS_ERROR, b"ENOENT\0");
        true
    });
    let e = client.read("backend/vbd/5/51712/params").unwrap_err();
    assert_eq!(e.to_string(), "ENOENT reading backend/vbd/5/51712/params");
    assert_eq!(e.errno(), Some(libc::ENOENT));
    assert!(e.is_not_found());
    assert_eq!(client.stats().error_replies, 1);
    assert_eq!(client.try_read("backend/x").unwrap(), None);
}

#[test]
fn test_client_oversized_reply_header_kills_connection_and_every_caller_errors() {
    // Arrange: the first request gets a header announcing 4 GiB (XSA-72).
    let (client, h) = fake_server(ClientOptions::default(), |m, s| {
        let hdr = XsdSockmsg {
            type_: msg::XS_READ,
            req_id: m.req_id,
            tx_id: 0,
            len: 0xffff_ffff,
        };
        s.write_all(hdr.as_bytes()).unwrap();
        true
    });
    let watchq = xenbus::EventQueue::new(4);
    // Act
    let e = client.read("/a").unwrap_err();
    let later = client.write("/b", b"x").unwrap_err();
    // Assert
    assert!(e.is_dead(), "{e}");
    assert!(e.to_string().contains("4294967295"), "{e}");
    assert!(later.is_dead());
    assert!(client.dead_reason().is_some());
    assert!(client.watch_into("/w", "t", &watchq).unwrap_err().is_dead());
    drop(client);
    h.join().unwrap();
}

#[test]
fn test_client_server_hangs_up_waiters_get_dead_not_hang() {
    // Arrange: the server collects 4 requests and then closes the connection.
    let (client, _h) = fake_server(ClientOptions::default(), {
        let mut n = 0;
        move |_, _| {
            n += 1;
            n < 4
        }
    });
    let w = {
        // A watch set before the hang-up must be closed by it: answer its WATCH first.
        let (c2, _h2) = fake_server(ClientOptions::default(), |m, s| {
            if m.type_ == msg::XS_WATCH {
                reply(s, &m, msg::XS_WATCH, b"OK\0");
                true
            } else {
                false
            }
        });
        let w = c2.watch("/x", "tok").unwrap();
        // Act (second connection): the server hangs up on the next request.
        assert!(c2.read("/y").unwrap_err().is_dead());
        w
    };
    // Act
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let c = client.clone();
            std::thread::spawn(move || c.read(&format!("/p{i}")))
        })
        .collect();
    // Assert
    for h in handles {
        let e = h.join().unwrap().unwrap_err();
        assert!(e.is_dead(), "{e}");
    }
    assert_eq!(
        w.recv_timeout(WAIT),
        Err(xenbus::watch::RecvTimeoutError::Disconnected)
    );
}

#[test]
fn test_client_silent_server_with_timeout_returns_timeout() {
    let opts = ClientOptions {
        request_timeout: Some(Duration::from_millis(50)),
        ..ClientOptions::default()
    };
    let (client, _h) = fake_server(opts, |_, _| true);
    let e = client.read("/never").unwrap_err();
    assert!(matches!(e, XsError::Timeout { .. }), "{e}");
    assert!(client.dead_reason().is_none());
}

#[test]
fn test_client_watch_event_reaches_its_stream_with_user_token() {
    // Arrange: WATCH is answered, then an event with the token the client chose is sent.
    let (client, _h) = fake_server(ClientOptions::default(), |m, s| {
        if m.type_ == msg::XS_WATCH {
            let parts = split_nul(&m.payload);
            let token = parts[1].to_vec();
            reply(s, &m, msg::XS_WATCH, b"OK\0");
            let mut ev = b"/a/b\0".to_vec();
            ev.extend_from_slice(&token);
            ev.push(0);
            reply(s, &Message { req_id: 0, ..m }, msg::XS_WATCH_EVENT, &ev);
            // Garbage events must be ignored without harm.
            reply(
                s,
                &Message {
                    req_id: 0,
                    type_: 0,
                    tx_id: 0,
                    payload: vec![],
                },
                msg::XS_WATCH_EVENT,
                b"\xff\xfe",
            );
            reply(
                s,
                &Message {
                    req_id: 0,
                    type_: 0,
                    tx_id: 0,
                    payload: vec![],
                },
                msg::XS_WATCH_EVENT,
                b"/a\0unknown\0",
            );
        } else {
            reply(s, &m, m.type_, b"OK\0");
        }
        true
    });
    // Act
    let w = client.watch("/a", "mytoken").unwrap();
    let ev = w.recv_timeout(WAIT).unwrap();
    // Assert
    assert_eq!(ev.path, "/a/b");
    assert_eq!(ev.token, "mytoken");
    assert!(!ev.overflowed);
    w.unwatch().unwrap();
    assert!(client.dead_reason().is_none());
}

#[test]
fn test_client_directory_e2big_is_fetched_in_parts_and_restarts_on_generation_change() {
    // Arrange: DIRECTORY says E2BIG; DIRECTORY_PART serves "a\0bb\0" and "ccc\0\0" in two
    // parts, but the generation changes once between them, forcing a restart.
    let calls = Arc::new(AtomicU32::new(0));
    let calls2 = Arc::clone(&calls);
    let (client, _h) = fake_server(ClientOptions::default(), move |m, s| {
        match m.type_ {
            msg::XS_DIRECTORY => reply(s, &m, msg::XS_ERROR, b"E2BIG\0"),
            msg::XS_DIRECTORY_PART => {
                let n = calls2.fetch_add(1, Ordering::SeqCst);
                let parts = split_nul(&m.payload);
                let off = std::str::from_utf8(parts[1]).unwrap();
                let gen: &[u8] = if n == 1 { b"8\0" } else { b"7\0" };
                let body: &[u8] = match off {
                    "0" => b"a\0bb\0",
                    "5" => b"ccc\0\0",
                    _ => panic!("offset {off}"),
                };
                reply(s, &m, msg::XS_DIRECTORY_PART, &[gen, body].concat());
            }
            _ => reply(s, &m, msg::XS_ERROR, b"EINVAL\0"),
        }
        true
    });
    // Act
    let names = client.directory("/big").unwrap();
    // Assert
    assert_eq!(names, vec!["a", "bb", "ccc"]);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[test]
fn test_client_directory_part_unsupported_reports_e2big() {
    let (client, _h) = fake_server(ClientOptions::default(), |m, s| {
        match m.type_ {
            msg::XS_DIRECTORY => reply(s, &m, msg::XS_ERROR, b"E2BIG\0"),
            _ => reply(s, &m, msg::XS_ERROR, b"ENOSYS\0"),
        }
        true
    });
    let e = client.directory("/big").unwrap_err();
    assert_eq!(e.errno(), Some(libc::E2BIG));
    assert_eq!(e.to_string(), "E2BIG listing /big");
}

#[test]
fn test_client_transaction_commit_eagain_is_retried_and_write_carries_tx_id() {
    // Arrange: the first commit conflicts.
    let commits = Arc::new(AtomicU32::new(0));
    let commits2 = Arc::clone(&commits);
    let (client, _h) = fake_server(ClientOptions::default(), move |m, s| {
        match m.type_ {
            msg::XS_TRANSACTION_START => reply(s, &m, m.type_, b"17\0"),
            msg::XS_WRITE => {
                assert_eq!(m.tx_id, 17);
                reply(s, &m, m.type_, b"OK\0");
            }
            msg::XS_TRANSACTION_END => {
                if commits2.fetch_add(1, Ordering::SeqCst) == 0 {
                    reply(s, &m, msg::XS_ERROR, b"EAGAIN\0");
                } else {
                    reply(s, &m, m.type_, b"OK\0");
                }
            }
            _ => reply(s, &m, msg::XS_ERROR, b"EINVAL\0"),
        }
        true
    });
    let mut runs = 0;
    // Act
    let r: Result<u32, XsError> = client.transaction(|tx| {
        runs += 1;
        tx.write("/k", b"v")?;
        Ok(tx.id())
    });
    // Assert
    assert_eq!(r.unwrap(), 17);
    assert_eq!(runs, 2);
    assert_eq!(commits.load(Ordering::SeqCst), 2);
}

#[test]
fn test_client_transaction_always_eagain_gives_up_after_cap() {
    let opts = ClientOptions {
        tx_max_attempts: 4,
        tx_backoff_base: Duration::from_micros(10),
        tx_backoff_cap: Duration::from_micros(100),
        ..ClientOptions::default()
    };
    let (client, _h) = fake_server(opts, |m, s| {
        match m.type_ {
            msg::XS_TRANSACTION_START => reply(s, &m, m.type_, b"3\0"),
            msg::XS_TRANSACTION_END => reply(s, &m, msg::XS_ERROR, b"EAGAIN\0"),
            _ => reply(s, &m, m.type_, b"OK\0"),
        }
        true
    });
    let r: Result<(), XsError> = client.transaction(|tx| tx.write("/k", b"v"));
    assert!(matches!(
        r,
        Err(XsError::TransactionRetriesExhausted { attempts: 4 })
    ));
}

#[test]
fn test_client_transaction_closure_error_aborts_without_retry() {
    let ends = Arc::new(Mutex::new(Vec::new()));
    let ends2 = Arc::clone(&ends);
    let (client, _h) = fake_server(ClientOptions::default(), move |m, s| {
        match m.type_ {
            msg::XS_TRANSACTION_START => reply(s, &m, m.type_, b"9\0"),
            msg::XS_TRANSACTION_END => {
                ends2.lock().unwrap().push(m.payload.clone());
                reply(s, &m, m.type_, b"OK\0");
            }
            _ => reply(s, &m, msg::XS_ERROR, b"EACCES\0"),
        }
        true
    });
    let mut runs = 0;
    let r: Result<(), XsError> = client.transaction(|tx| {
        runs += 1;
        tx.write("/k", b"v")
    });
    assert_eq!(r.unwrap_err().errno(), Some(libc::EACCES));
    assert_eq!(runs, 1);
    assert_eq!(*ends.lock().unwrap(), vec![b"F\0".to_vec()]);
}

#[test]
fn test_client_bad_paths_are_refused_before_sending() {
    let (client, _h) = fake_server(ClientOptions::default(), |_, _| {
        panic!("nothing may be sent")
    });
    assert!(matches!(
        client.read("a\0b"),
        Err(XsError::BadRequest { .. })
    ));
    assert!(matches!(
        client.write("", b"x"),
        Err(XsError::BadRequest { .. })
    ));
    let long = "/".repeat(3073);
    assert!(matches!(client.rm(&long), Err(XsError::BadRequest { .. })));
    assert!(matches!(
        client.write("/k", &vec![b'x'; 5000]),
        Err(XsError::BadRequest { .. })
    ));
}

#[test]
fn test_client_reply_of_wrong_type_is_malformed_not_panic() {
    let (client, _h) = fake_server(ClientOptions::default(), |m, s| {
        reply(s, &m, msg::XS_DIRECTORY, b"x\0");
        true
    });
    assert!(matches!(client.read("/a"), Err(XsError::BadReply { .. })));
    assert!(matches!(
        client.is_domain_introduced(3),
        Err(XsError::BadReply { .. })
    ));
}

#[test]
fn test_client_drop_closes_connection_and_reader() {
    // Arrange
    let (client, h) = fake_server(ClientOptions::default(), |m, s| {
        reply(s, &m, m.type_, b"OK\0");
        true
    });
    client.write("/a", b"1").unwrap();
    // Act
    drop(client);
    // Assert: the server sees EOF, so its thread ends.
    h.join().unwrap();
}
