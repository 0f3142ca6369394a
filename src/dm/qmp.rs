//! QMP (the QEMU Machine Protocol, docs/interop/qmp-spec.rst) on the unix sockets libxl names
//! with `-chardev socket,...,server=on -mon ...,mode=control`: the greeting, capability
//! negotiation, and the commands libxl 4.17 sends a device model (`libxl_qmp.c`,
//! `libxl_dm.c`, `libxl_domain.c`, `libxl_pci.c`).
//!
//! A client is untrusted input: every request is bounded ([`MAX_REQUEST`]), anything that is
//! not a JSON object with a string `execute` gets a QMP error (never a crash), a request
//! larger than the bound closes that connection, and at most [`MAX_CLIENTS`] connections are
//! served per socket at once. Nothing a client sends reaches the guest except `cont`, `stop`
//! and `quit`, which only root (the socket is mode 0600) can send.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tracing::{debug, info, warn};

/// Largest request accepted (bytes); a larger one closes the connection.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Connections served at once per socket.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may stay silent before its connection is closed.
pub const CLIENT_IDLE: Duration = Duration::from_secs(120);

/// The QEMU version announced in the greeting: the one Xen 4.17's Debian packages ship
/// (libxl compares versions to choose how to talk to the device model).
const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// What a device-state file written by `xen-save-devices-state` starts with.
const STATE_MAGIC: &str = "domio-device-state";

/// Something the device model does when a command asks it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `quit`: shut down cleanly.
    Quit,
}

/// The device model's side of QMP: what the commands read and change.
pub struct DmState {
    domid: u32,
    pv: bool,
    running: AtomicBool,
    dirty_log: AtomicBool,
    chardevs: Mutex<Vec<(String, String)>>,
    requests: crossbeam_channel::Sender<Request>,
}

impl DmState {
    /// The state of domain `domid`'s device model (`pv`: the xenpv machine), running.
    pub fn new(domid: u32, pv: bool, requests: crossbeam_channel::Sender<Request>) -> Arc<DmState> {
        Arc::new(DmState {
            domid,
            pv,
            running: AtomicBool::new(true),
            dirty_log: AtomicBool::new(false),
            chardevs: Mutex::new(Vec::new()),
            requests,
        })
    }

    /// Adds a character device for `query-chardev` (label, filename as QEMU spells it:
    /// `unix:PATH,server=on`, `pty:/dev/pts/N`).
    pub fn add_chardev(&self, label: &str, filename: &str) {
        self.chardevs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((label.to_string(), filename.to_string()));
    }

    /// Whether the guest's emulation runs (`cont`) or is stopped (`stop`).
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether log-dirty mode was asked for (`xen-set-global-dirty-log`).
    #[cfg(test)]
    pub fn dirty_log(&self) -> bool {
        self.dirty_log.load(Ordering::SeqCst)
    }
}

/// A QMP error: its class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    class: &'static str,
    desc: String,
}

impl QmpError {
    fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    fn to_json(&self, id: Option<&Value>) -> Value {
        let mut v = json!({"error": {"class": self.class, "desc": self.desc}});
        if let (Some(id), Some(o)) = (id, v.as_object_mut()) {
            o.insert("id".into(), id.clone());
        }
        v
    }
}

/// The commands served (for `query-commands`).
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-status",
    "query-chardev",
    "query-vnc",
    "query-pci",
    "cont",
    "stop",
    "quit",
    "xen-save-devices-state",
    "xen-load-devices-state",
    "xen-set-global-dirty-log",
    "device_del",
];

fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, QmpError> {
    match args.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{name}', expected: string"
        ))),
        None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
    }
}

fn bool_arg(args: &Map<String, Value>, name: &str) -> Result<bool, QmpError> {
    match args.get(name) {
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{name}', expected: boolean"
        ))),
        None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
    }
}

/// Runs one negotiated command.
fn execute(st: &DmState, cmd: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
    match cmd {
        "query-commands" => Ok(Value::Array(
            COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
        )),
        "query-version" => {
            let (major, minor, micro) = QEMU_VERSION;
            Ok(
                json!({"qemu": {"major": major, "minor": minor, "micro": micro},
                      "package": format!("domio {}", env!("CARGO_PKG_VERSION"))}),
            )
        }
        "query-status" => {
            let running = st.running();
            Ok(json!({"status": if running { "running" } else { "paused" },
                      "running": running, "singlestep": false}))
        }
        "query-chardev" => {
            let list = st.chardevs.lock().unwrap_or_else(|e| e.into_inner());
            Ok(Value::Array(
                list.iter()
                    .map(|(l, f)| json!({"label": l, "filename": f, "frontend-open": true}))
                    .collect(),
            ))
        }
        "query-vnc" => Ok(json!({"enabled": false})),
        // No PCI device of ours can be listed or removed through QMP: a PV device model has
        // no PCI bus, and the HVM machine's devices are not hot-pluggable.
        "query-pci" => Ok(if st.pv {
            json!([])
        } else {
            json!([{"bus": 0, "devices": []}])
        }),
        "device_del" => {
            let id = str_arg(args, "id")?;
            Err(QmpError {
                class: "DeviceNotFound",
                desc: format!("Device '{id}' not found"),
            })
        }
        "cont" => {
            st.running.store(true, Ordering::SeqCst);
            info!("QMP cont: emulation runs");
            Ok(json!({}))
        }
        "stop" => {
            st.running.store(false, Ordering::SeqCst);
            info!("QMP stop: emulation stopped");
            Ok(json!({}))
        }
        "quit" => {
            info!("QMP quit");
            let _ = st.requests.try_send(Request::Quit);
            Ok(json!({}))
        }
        "xen-set-global-dirty-log" => {
            let on = bool_arg(args, "enable")?;
            st.dirty_log.store(on, Ordering::SeqCst);
            info!(enable = on, "QMP xen-set-global-dirty-log");
            Ok(json!({}))
        }
        "xen-save-devices-state" => {
            let path = str_arg(args, "filename")?;
            if !st.pv {
                return Err(QmpError::generic(
                    "domio cannot save an HVM guest's device state (save and migration of HVM guests are not supported)",
                ));
            }
            // A PV device model keeps no device state of its own: the backends' state is in
            // xenstore and the rings, and frontends reconnect after a restore.
            let body = json!({ STATE_MAGIC: 1, "domid": st.domid, "machine": "xenpv" });
            std::fs::write(path, format!("{body}\n"))
                .map_err(|e| QmpError::generic(format!("cannot write {path}: {e}")))?;
            Ok(json!({}))
        }
        "xen-load-devices-state" => {
            let path = str_arg(args, "filename")?;
            let text = read_state_file(path)?;
            let v: Value = serde_json::from_slice(&text).map_err(|_| {
                QmpError::generic(format!("{path} is not a device state domio wrote"))
            })?;
            if v.get(STATE_MAGIC) != Some(&json!(1)) || v.get("machine") != Some(&json!("xenpv")) {
                return Err(QmpError::generic(format!(
                    "{path} is not a xenpv device state domio wrote"
                )));
            }
            if !st.pv {
                return Err(QmpError::generic(
                    "a xenpv device state cannot be loaded into an HVM device model",
                ));
            }
            Ok(json!({}))
        }
        _ => Err(QmpError {
            class: "CommandNotFound",
            desc: format!("The command {cmd} has not been found"),
        }),
    }
}

/// Largest device-state file read back (ours are under 100 bytes).
const MAX_STATE_FILE: u64 = 4096;

/// A device-state file: a regular file, read up to [`MAX_STATE_FILE`] bytes (a path such as
/// /dev/zero or a FIFO must not exhaust memory or block the client's thread).
fn read_state_file(path: &str) -> Result<Vec<u8>, QmpError> {
    let err = |e: std::io::Error| QmpError::generic(format!("cannot read {path}: {e}"));
    let f = std::fs::File::open(path).map_err(err)?;
    if !f.metadata().map_err(err)?.is_file() {
        return Err(QmpError::generic(format!("{path} is not a regular file")));
    }
    let mut buf = Vec::new();
    f.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > MAX_STATE_FILE {
        return Err(QmpError::generic(format!(
            "{path} is larger than a device state domio writes"
        )));
    }
    Ok(buf)
}

/// One client's session: negotiation state.
struct Session {
    negotiated: bool,
}

impl Session {
    /// Answers one request (already parsed as JSON).
    fn answer(&mut self, st: &DmState, req: &Value) -> Value {
        let Some(obj) = req.as_object() else {
            return QmpError::generic("QMP input must be a JSON object").to_json(None);
        };
        let id = obj.get("id");
        let cmd = match obj.get("execute") {
            Some(Value::String(c)) => c.as_str(),
            Some(_) => {
                return QmpError::generic("QMP input member 'execute' must be a string").to_json(id)
            }
            None => return QmpError::generic("QMP input lacks member 'execute'").to_json(id),
        };
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(a)) => a,
            Some(_) => {
                return QmpError::generic("QMP input member 'arguments' must be an object")
                    .to_json(id)
            }
        };
        let result = match (self.negotiated, cmd) {
            (false, "qmp_capabilities") => {
                self.negotiated = true;
                Ok(json!({}))
            }
            (false, _) => Err(QmpError {
                class: "CommandNotFound",
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            }),
            (true, "qmp_capabilities") => Err(QmpError {
                class: "CommandNotFound",
                desc: "Capabilities negotiation is already complete, command ignored".into(),
            }),
            (true, c) => execute(st, c, args),
        };
        match result {
            Ok(r) => {
                let mut v = json!({ "return": r });
                if let (Some(id), Some(o)) = (id, v.as_object_mut()) {
                    o.insert("id".into(), id.clone());
                }
                v
            }
            Err(e) => e.to_json(id),
        }
    }
}

fn greeting() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"QMP": {"version": {"qemu": {"micro": micro, "minor": minor, "major": major},
                               "package": format!("domio {}", env!("CARGO_PKG_VERSION"))},
                   "capabilities": []}})
}

fn send(w: &mut impl Write, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push_str("\r\n");
    w.write_all(line.as_bytes())?;
    w.flush()
}

/// Serves one connection until the client leaves, sends too much, or the stream fails.
pub fn serve_client(st: &DmState, stream: UnixStream) -> io::Result<()> {
    // A client that stays silent this long gives its slot back (libxl opens a connection
    // per command).
    stream.set_read_timeout(Some(CLIENT_IDLE))?;
    let mut out = stream.try_clone()?;
    let mut input = BufReader::new(stream);
    send(&mut out, &greeting())?;
    let mut session = Session { negotiated: false };
    // A request may span lines: bytes collect here until they parse, fail to parse, or pass
    // the bound.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        // At most one byte past the bound is read, so a client cannot make us buffer more.
        let room = (MAX_REQUEST + 1).saturating_sub(pending.len()) as u64;
        let before = pending.len();
        let n = (&mut input).take(room).read_until(b'\n', &mut pending)?;
        if n == 0 {
            return Ok(());
        }
        // Blank lines after an incomplete request change nothing: no new parse (a client
        // sending "{" and then thousands of newlines must not cost a parse each).
        if before > 0 && pending[before..].iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if pending.len() > MAX_REQUEST {
            let e = QmpError::generic(format!(
                "request larger than {MAX_REQUEST} bytes; closing the connection"
            ));
            let _ = send(&mut out, &e.to_json(None));
            return Ok(());
        }
        if pending.iter().all(u8::is_ascii_whitespace) {
            pending.clear();
            continue;
        }
        let mut values = serde_json::Deserializer::from_slice(&pending).into_iter::<Value>();
        let mut answers = Vec::new();
        let mut consumed = 0;
        let mut incomplete = false;
        loop {
            match values.next() {
                None => break,
                Some(Ok(v)) => {
                    consumed = values.byte_offset();
                    answers.push(session.answer(st, &v));
                }
                Some(Err(e)) if e.is_eof() => {
                    incomplete = true;
                    break;
                }
                Some(Err(e)) => {
                    answers.push(QmpError::generic(format!("JSON parse error, {e}")).to_json(None));
                    // Drop the rest of what was received: resynchronise at the next line.
                    consumed = pending.len();
                    break;
                }
            }
        }
        pending.drain(..consumed.min(pending.len()));
        if !incomplete && pending.iter().all(u8::is_ascii_whitespace) {
            pending.clear();
        }
        for a in &answers {
            send(&mut out, a)?;
        }
    }
}

/// The QMP sockets of one device model.
pub struct QmpServer {
    paths: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
}

impl QmpServer {
    /// Listens on every path (a stale socket file is replaced; the socket is mode 0600) and
    /// serves each connection on a thread of its own.
    pub fn start(st: Arc<DmState>, paths: &[PathBuf]) -> anyhow::Result<QmpServer> {
        use anyhow::Context;
        let stop = Arc::new(AtomicBool::new(false));
        let mut bound = Vec::new();
        for p in paths {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {} for the QMP socket", dir.display()))?;
            }
            match std::fs::remove_file(p) {
                Ok(()) => debug!(path = %p.display(), "removed a stale QMP socket"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("removing the old {}", p.display()))
                }
            }
            let l = UnixListener::bind(p)
                .with_context(|| format!("listening for QMP on {}", p.display()))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private", p.display()))?;
            bound.push((p.clone(), l));
        }
        let paths: Vec<PathBuf> = bound.iter().map(|(p, _)| p.clone()).collect();
        for (p, l) in bound {
            let st = st.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || accept_loop(&p, &l, &st, &stop))
                .context("starting the QMP thread")?;
        }
        Ok(QmpServer { paths, stop })
    }
}

fn accept_loop(path: &Path, l: &UnixListener, st: &Arc<DmState>, stop: &AtomicBool) {
    let clients = Arc::new(AtomicUsize::new(0));
    for conn in l.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "QMP accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
            warn!(path = %path.display(), "QMP: {MAX_CLIENTS} clients already connected; refusing another");
            continue;
        }
        clients.fetch_add(1, Ordering::SeqCst);
        let st = st.clone();
        let slot = clients.clone();
        let p = path.display().to_string();
        let spawned = std::thread::Builder::new()
            .name("qmp-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(&st, stream) {
                    debug!(path = %p, error = %e, "QMP client gone");
                }
                slot.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The closure (and its decrement) never runs: give the slot back here.
            clients.fetch_sub(1, Ordering::SeqCst);
            warn!(path = %path.display(), "QMP: cannot start a client thread");
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for p in &self.paths {
            // Wake the accept loop so it sees the flag, then remove the socket.
            let _ = UnixStream::connect(p);
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pv: bool) -> (Arc<DmState>, crossbeam_channel::Receiver<Request>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let st = DmState::new(7, pv, tx);
        st.add_chardev("libxl-cmd", "unix:/var/run/xen/qmp-libxl-7,server=on");
        (st, rx)
    }

    /// A client connected to a served socket pair: reads one line at a time.
    struct Client {
        w: UnixStream,
        r: BufReader<UnixStream>,
    }

    impl Client {
        fn new(st: &Arc<DmState>) -> Client {
            let (a, b) = UnixStream::pair().unwrap();
            let st = st.clone();
            std::thread::spawn(move || serve_client(&st, b));
            a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            Client {
                w: a.try_clone().unwrap(),
                r: BufReader::new(a),
            }
        }
        fn line(&mut self) -> Value {
            let mut s = String::new();
            self.r.read_line(&mut s).unwrap();
            assert!(s.ends_with("\r\n"), "{s:?}");
            serde_json::from_str(&s).unwrap()
        }
        fn raw(&mut self, s: &str) -> Value {
            self.w.write_all(s.as_bytes()).unwrap();
            self.line()
        }
        fn cmd(&mut self, v: Value) -> Value {
            self.raw(&format!("{v}\r\n"))
        }
        fn negotiated(st: &Arc<DmState>) -> Client {
            let mut c = Client::new(st);
            let g = c.line();
            assert_eq!(g["QMP"]["version"]["qemu"]["major"], 7);
            assert_eq!(
                c.cmd(json!({"execute": "qmp_capabilities"})),
                json!({"return": {}})
            );
            c
        }
    }

    #[test]
    fn test_qmp_greets_then_requires_capabilities_negotiation() {
        let (st, _rx) = state(true);
        let mut c = Client::new(&st);
        let g = c.line();
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        let r = c.cmd(json!({"execute": "query-status", "id": 1}));
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(r["id"], 1);
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities", "id": "a"})),
            json!({"return": {}, "id": "a"})
        );
        let r = c.cmd(json!({"execute": "qmp_capabilities"}));
        assert_eq!(r["error"]["class"], "CommandNotFound");
    }

    #[test]
    fn test_qmp_answers_libxl_commands() {
        let (st, rx) = state(true);
        let mut c = Client::negotiated(&st);
        let r = c.cmd(json!({"execute": "query-chardev", "id": 2}));
        assert_eq!(r["return"][0]["label"], "libxl-cmd");
        assert_eq!(
            r["return"][0]["filename"],
            "unix:/var/run/xen/qmp-libxl-7,server=on"
        );
        assert_eq!(r["id"], 2);
        assert_eq!(
            c.cmd(json!({"execute": "query-status"}))["return"]["status"],
            "running"
        );
        assert_eq!(c.cmd(json!({"execute": "stop"})), json!({"return": {}}));
        assert!(!st.running());
        assert_eq!(
            c.cmd(json!({"execute": "query-status"}))["return"]["running"],
            false
        );
        assert_eq!(c.cmd(json!({"execute": "cont"})), json!({"return": {}}));
        assert!(st.running());
        assert_eq!(
            c.cmd(json!({"execute": "query-vnc"}))["return"]["enabled"],
            false
        );
        assert_eq!(c.cmd(json!({"execute": "query-pci"}))["return"], json!([]));
        let r = c.cmd(json!({"execute": "device_del", "arguments": {"id": "pci-pt-00_1f.0"}}));
        assert_eq!(r["error"]["class"], "DeviceNotFound");
        let r =
            c.cmd(json!({"execute": "xen-set-global-dirty-log", "arguments": {"enable": true}}));
        assert_eq!(r, json!({"return": {}}));
        assert!(st.dirty_log());
        let r =
            c.cmd(json!({"execute": "xen-set-global-dirty-log", "arguments": {"enable": "yes"}}));
        assert_eq!(r["error"]["class"], "GenericError");
        let r = c.cmd(json!({"execute": "frobnicate"}));
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert!(r["error"]["desc"].as_str().unwrap().contains("frobnicate"));
        assert_eq!(c.cmd(json!({"execute": "quit"})), json!({"return": {}}));
        assert_eq!(rx.try_recv(), Ok(Request::Quit));
    }

    #[test]
    fn test_qmp_saves_and_loads_a_pv_device_state_and_refuses_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("state");
        let fs = f.to_str().unwrap();
        let (st, _rx) = state(true);
        let mut c = Client::negotiated(&st);
        let r = c.cmd(json!({"execute": "xen-save-devices-state", "arguments": {"filename": fs, "live": false}}));
        assert_eq!(r, json!({"return": {}}));
        let r = c.cmd(json!({"execute": "xen-load-devices-state", "arguments": {"filename": fs}}));
        assert_eq!(r, json!({"return": {}}));
        let r = c.cmd(
            json!({"execute": "xen-load-devices-state", "arguments": {"filename": "/dev/zero"}}),
        );
        assert!(
            r["error"]["desc"]
                .as_str()
                .unwrap()
                .contains("not a regular file"),
            "{r}"
        );
        std::fs::write(&f, vec![b' '; 10_000]).unwrap();
        let r = c.cmd(json!({"execute": "xen-load-devices-state", "arguments": {"filename": fs}}));
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("larger"),
            "{r}"
        );
        std::fs::write(&f, b"QEVM\x00\x00\x00\x03").unwrap();
        let r = c.cmd(json!({"execute": "xen-load-devices-state", "arguments": {"filename": fs}}));
        assert_eq!(r["error"]["class"], "GenericError");
        let r = c.cmd(json!({"execute": "xen-save-devices-state", "arguments": {}}));
        assert!(r["error"]["desc"].as_str().unwrap().contains("filename"));
        let (hvm, _rx) = state(false);
        let mut c = Client::negotiated(&hvm);
        let r = c.cmd(json!({"execute": "xen-save-devices-state", "arguments": {"filename": fs}}));
        assert!(r["error"]["desc"].as_str().unwrap().contains("HVM"));
    }

    #[test]
    fn test_qmp_garbage_gets_errors_and_the_session_goes_on() {
        let (st, _rx) = state(true);
        let mut c = Client::negotiated(&st);
        for bad in [
            "{\"execute\": \r\n}\r\n",
            "not json at all\n",
            "[1,2,3]\n",
            "42\n",
            "{\"arguments\": {}}\n",
            "{\"execute\": 5}\n",
            "{\"execute\": \"query-status\", \"arguments\": [1]}\n",
            "\u{0}\u{1}\u{ff}\n",
        ] {
            let r = c.raw(bad);
            assert_eq!(r["error"]["class"], "GenericError", "{bad:?} -> {r}");
        }
        // Two requests in one write, and one split across writes.
        c.w.write_all(b"{\"execute\":\"cont\",\"id\":1}{\"execute\":\"cont\",\"id\":2}\n")
            .unwrap();
        assert_eq!(c.line()["id"], 1);
        assert_eq!(c.line()["id"], 2);
        c.w.write_all(b"{\"execute\":\n").unwrap();
        assert_eq!(c.raw("\"query-status\"}\n")["return"]["status"], "running");
    }

    #[test]
    fn test_qmp_oversized_request_closes_only_that_connection() {
        let (st, _rx) = state(true);
        let mut c = Client::negotiated(&st);
        let big = vec![b'['; MAX_REQUEST + 10];
        let _ = c.w.write_all(&big);
        let r = c.line();
        assert!(r["error"]["desc"].as_str().unwrap().contains("larger than"));
        let mut rest = Vec::new();
        let _ = c.r.read_to_end(&mut rest);
        assert!(rest.is_empty());
        let mut d = Client::negotiated(&st);
        assert_eq!(
            d.cmd(json!({"execute": "query-status"}))["return"]["running"],
            true
        );
    }

    #[test]
    fn test_qmp_server_listens_privately_replaces_stale_sockets_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qmp-libxl-7");
        std::fs::write(&p, b"stale").unwrap();
        let (st, _rx) = state(true);
        let srv = QmpServer::start(st, std::slice::from_ref(&p)).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s = UnixStream::connect(&p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.contains("\"QMP\""));
        drop(srv);
        assert!(!p.exists());
    }
}
