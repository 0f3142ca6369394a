//! The control socket of `domio serve --control PATH`: one JSON object per line, in QMP's
//! shape. A request is `{"execute": "<command>", "arguments": {...}}`; the answer is
//! `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`. A client that sends garbage
//! gets an error answer and can go on; nothing it sends can stop the service.
//!
//! `domio serve` answers `stats` (per-device counters of the console, blk and net backends),
//! `devices` (XenBus states) and `resize` (`{"devid": N}`: online resize of a disk after its
//! image grew). `domio hvm` answers `stats` (the ioreq server's counters) and `devices` (the
//! machine's devices and its serial console).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::serve::Service;

/// What a control socket serves: a `domio serve` or a `domio hvm`.
pub trait ControlTarget: Send + Sync + 'static {
    /// The guest.
    fn domid(&self) -> u32;
    /// Answers one command; `None` if there is no such command.
    fn execute(&self, cmd: &str, args: &Value) -> Option<Value>;
}

/// Longest request line.
const MAX_LINE: u64 = 64 * 1024;
/// Most clients at once.
const MAX_CLIENTS: usize = 16;

/// A running control socket. Dropping it stops accepting and removes the socket file.
pub struct Control {
    path: PathBuf,
    listener: UnixListener,
    thread: Option<JoinHandle<()>>,
}

impl Control {
    /// Listens on `path` (a stale socket file is replaced).
    pub fn start(path: &Path, svc: Arc<dyn ControlTarget>) -> anyhow::Result<Control> {
        if path.exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
        let l = listener
            .try_clone()
            .context("cloning the control listener")?;
        let clients = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in l.incoming() {
                    let Ok(conn) = conn else { break };
                    if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                        clients.fetch_sub(1, Ordering::SeqCst);
                        let _ = reply(&conn, &error("GenericError", "too many control clients"));
                        continue;
                    }
                    let (svc, clients) = (svc.clone(), clients.clone());
                    let spawned = std::thread::Builder::new()
                        .name("control-client".into())
                        .spawn(move || {
                            serve_client(conn, svc.as_ref());
                            clients.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        warn!("could not start a control client thread");
                    }
                }
            })
            .context("starting the control thread")?;
        Ok(Control {
            path: path.to_path_buf(),
            listener,
            thread: Some(thread),
        })
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // Wakes the accept loop (accept fails once the listener is shut down).
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn reply(mut conn: &UnixStream, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    conn.write_all(line.as_bytes())
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn serve_client(conn: UnixStream, svc: &dyn ControlTarget) {
    let _ = reply(
        &conn,
        &json!({"domio": {"version": env!("CARGO_PKG_VERSION"), "domid": svc.domid()}}),
    );
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if buf.last() != Some(&b'\n') && buf.len() as u64 >= MAX_LINE {
            let _ = reply(
                &conn,
                &error("GenericError", "request line longer than 64 KiB"),
            );
            return;
        }
        let answer = match serde_json::from_slice::<Value>(&buf) {
            Ok(req) => execute(svc, &req),
            Err(e) => error("GenericError", &format!("invalid JSON: {e}")),
        };
        if reply(&conn, &answer).is_err() {
            return;
        }
    }
}

fn execute(svc: &dyn ControlTarget, req: &Value) -> Value {
    let Some(cmd) = req.get("execute").and_then(Value::as_str) else {
        return error("GenericError", "expected an object with \"execute\"");
    };
    let args = req.get("arguments").cloned().unwrap_or(Value::Null);
    debug!(cmd, "control request");
    svc.execute(cmd, &args).unwrap_or_else(|| {
        error(
            "CommandNotFound",
            &format!("the command {cmd} has not been found"),
        )
    })
}

impl ControlTarget for Service {
    fn domid(&self) -> u32 {
        u32::from(Service::domid(self))
    }

    fn execute(&self, cmd: &str, args: &Value) -> Option<Value> {
        Some(execute_serve(self, cmd, args))
    }
}

fn execute_serve(svc: &Service, cmd: &str, args: &Value) -> Value {
    match cmd {
        "stats" => {
            let console: Vec<Value> = svc
                .console_stats()
                .into_iter()
                .map(|((domid, devid), s)| json!({"domid": domid, "devid": devid, "stats": s}))
                .collect();
            let blk: Vec<Value> = svc
                .blk_stats()
                .into_iter()
                .map(|((domid, devid), s)| json!({"domid": domid, "devid": devid, "stats": s}))
                .collect();
            let net: Vec<Value> = svc
                .net_stats()
                .into_iter()
                .map(|((domid, devid), s)| json!({"domid": domid, "devid": devid, "stats": s}))
                .collect();
            json!({"return": {"console": console, "blk": blk, "net": net}})
        }
        "devices" => {
            let mut out = Vec::new();
            for (t, devs) in svc.devices() {
                for d in devs {
                    out.push(json!({
                        "type": t,
                        "devid": d.devid,
                        "state": d.state.as_u8(),
                        "frontend_state": d.frontend_state.map(|s| s.as_u8()),
                        "connected": d.connected,
                        "probes": d.probes,
                    }));
                }
            }
            json!({"return": out})
        }
        "resize" => {
            let Some(devid) = args
                .get("devid")
                .and_then(Value::as_u64)
                .and_then(|d| u32::try_from(d).ok())
            else {
                return error("GenericError", "resize needs {\"devid\": <device number>}");
            };
            match svc.resize(devid) {
                Ok(sectors) => json!({"return": {"devid": devid, "sectors": sectors}}),
                Err(e) => error("GenericError", &format!("resize of disk {devid}: {e:#}")),
            }
        }
        other => error(
            "CommandNotFound",
            &format!("the command {other} has not been found"),
        ),
    }
}
