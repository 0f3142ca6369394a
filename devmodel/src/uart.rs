//! A 16550A UART (COM1 at 0x3f8, ISA IRQ 4).
//!
//! Registers: RBR/THR and IER (or the divisor latch when LCR.DLAB is set), IIR/FCR with
//! 16-byte FIFOs, LCR, MCR (loopback included), LSR, MSR and the scratch register. The
//! interrupt line follows the highest-priority pending source (line status, received data,
//! transmitter empty, modem status) gated by MCR.OUT2, as on a PC, and is driven with
//! XEN_DMOP_set_isa_irq_level. Transmission is immediate (the console sink never delays
//! the guest), so THR is always empty again by the time the guest looks. Below the FIFO
//! trigger level, received bytes raise the character-timeout interrupt at once instead of
//! after four character times.
//!
//! The console (`serial=` in xl.cfg): `pty` (the slave path is logged), `unix:/path,server`
//! (one client at a time), `file:/path` (output only), or `none`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::irq::IrqSink;
use crate::RateLog;

/// COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's IRQ.
pub const COM1_IRQ: u8 = 4;
const FIFO_LEN: usize = 16;
/// How many bytes a `file:` console may hold by default (16 MiB).
pub const FILE_CAP_DEFAULT: u64 = 16 << 20;

const IER_RDI: u8 = 1;
const IER_THRI: u8 = 2;
const IER_RLSI: u8 = 4;
const IER_MSI: u8 = 8;
const IIR_NONE: u8 = 1;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_CTI: u8 = 0x0c;
const IIR_FIFO: u8 = 0xc0;
const LCR_DLAB: u8 = 0x80;
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_BI: u8 = 0x10;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LSR_INT_ANY: u8 = 0x1e;
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MSR_DCTS: u8 = 0x01;
const MSR_ANY_DELTA: u8 = 0x0f;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_DCD: u8 = 0x80;

/// Errors setting up a serial console.
#[derive(Debug, thiserror::Error)]
pub enum UartError {
    /// The `serial=` value is not understood.
    #[error("serial={value:?}: {why}")]
    Spec {
        /// The value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Opening the backend failed.
    #[error("dom{domid}: serial console {what}: {source}")]
    Open {
        /// Domain.
        domid: xen::DomId,
        /// What.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where the console goes (an xl.cfg `serial=` value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// No console (`none`).
    None,
    /// A new pseudo-terminal.
    Pty,
    /// A listening unix socket.
    UnixServer(String),
    /// Output appended to a file.
    File(String),
}

impl SerialSpec {
    /// Parses `pty`, `unix:/path,server`, `file:/path`, `none`.
    pub fn parse(v: &str) -> Result<SerialSpec, UartError> {
        let err = |why| UartError::Spec {
            value: v.to_string(),
            why,
        };
        if v == "pty" {
            Ok(SerialSpec::Pty)
        } else if v == "none" || v == "null" {
            Ok(SerialSpec::None)
        } else if let Some(rest) = v.strip_prefix("unix:") {
            let mut parts = rest.split(',');
            let path = parts
                .next()
                .filter(|p| p.starts_with('/'))
                .ok_or_else(|| err("unix: needs an absolute path"))?;
            let mut server = false;
            for opt in parts {
                match opt {
                    "server" => server = true,
                    "nowait" | "wait=off" | "server=on" => server |= opt == "server=on",
                    _ => return Err(err("unknown unix: option (only server and nowait)")),
                }
            }
            if !server {
                return Err(err("only unix:/path,server is supported (domio listens)"));
            }
            Ok(SerialSpec::UnixServer(path.to_string()))
        } else if let Some(path) = v.strip_prefix("file:") {
            if !path.starts_with('/') {
                return Err(err("file: needs an absolute path"));
            }
            Ok(SerialSpec::File(path.to_string()))
        } else {
            Err(err("expected pty, unix:/path,server, file:/path or none"))
        }
    }
}

enum Sink {
    None,
    /// A log file: at most `cap` bytes in it (counting what was there at open), then
    /// every byte is dropped and counted.
    File {
        file: File,
        len: std::sync::atomic::AtomicU64,
        cap: u64,
    },
    Pty {
        master: File,
        _slave: File,
    },
    Unix(Mutex<Option<UnixStream>>),
}

struct Regs {
    ier: u8,
    lcr: u8,
    mcr: u8,
    lsr: u8,
    msr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fcr: u8,
    rx: VecDeque<u8>,
    thr_pending: bool,
    level: bool,
}

struct Shared {
    regs: Mutex<Regs>,
    space: Condvar,
    sink: Sink,
    irq: IrqSink,
    irq_no: u8,
    tx_dropped: std::sync::atomic::AtomicU64,
    log: RateLog,
}

/// The UART and its console.
pub struct Uart {
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    describe: String,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart")
            .field("console", &self.describe)
            .finish()
    }
}

impl Regs {
    fn trigger(&self) -> usize {
        if self.fcr & 1 == 0 {
            return 1;
        }
        match self.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }
    fn rx_cap(&self) -> usize {
        if self.fcr & 1 != 0 {
            FIFO_LEN
        } else {
            1
        }
    }
    fn iir(&self) -> u8 {
        let fifo = if self.fcr & 1 != 0 { IIR_FIFO } else { 0 };
        let id = if self.ier & IER_RLSI != 0 && self.lsr & LSR_INT_ANY != 0 {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            if self.rx.len() >= self.trigger() {
                IIR_RDI
            } else {
                IIR_CTI
            }
        } else if self.ier & IER_THRI != 0 && self.thr_pending {
            IIR_THRI
        } else if self.ier & IER_MSI != 0 && self.msr & MSR_ANY_DELTA != 0 {
            IIR_MSI
        } else {
            IIR_NONE
        };
        fifo | id
    }
    fn modem_inputs(&self) -> u8 {
        if self.mcr & MCR_LOOP != 0 {
            let m = self.mcr;
            (if m & MCR_RTS != 0 { MSR_CTS } else { 0 })
                | (if m & MCR_DTR != 0 { MSR_DSR } else { 0 })
                | (if m & MCR_OUT1 != 0 { 0x40 } else { 0 })
                | (if m & MCR_OUT2 != 0 { MSR_DCD } else { 0 })
        } else {
            MSR_CTS | MSR_DSR | MSR_DCD
        }
    }
    fn push_rx(&mut self, b: u8) -> bool {
        if self.rx.len() >= self.rx_cap() {
            self.lsr |= LSR_OE;
            return false;
        }
        self.rx.push_back(b);
        self.lsr |= LSR_DR;
        true
    }
}

impl Shared {
    fn regs(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn update_irq(&self, r: &mut Regs) {
        let level = r.iir() & IIR_NONE == 0 && r.mcr & MCR_OUT2 != 0;
        if level != r.level {
            r.level = level;
            self.irq.isa(self.irq_no, level);
        }
    }
    fn transmit(&self, b: u8) {
        let ok = match &self.sink {
            Sink::None => true,
            Sink::File { file, len, cap } => {
                // Only the ioreq thread transmits, so load-then-store does not race.
                let n = len.load(std::sync::atomic::Ordering::Relaxed);
                n < *cap && (&*file).write_all(&[b]).is_ok() && {
                    len.store(n + 1, std::sync::atomic::Ordering::Relaxed);
                    true
                }
            }
            Sink::Pty { master, .. } => (&*master).write(&[b]).is_ok_and(|n| n == 1),
            Sink::Unix(c) => {
                let mut g = c.lock().unwrap_or_else(|e| e.into_inner());
                match g.as_mut() {
                    Some(s) => match s.write(&[b]) {
                        Ok(1) => true,
                        Ok(_) | Err(_) => {
                            *g = None;
                            false
                        }
                    },
                    None => false,
                }
            }
        };
        if !ok {
            let n = self
                .tx_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_multiple_of(4096) {
                self.log.warn(format_args!(
                    "dom{}: serial console output dropped ({} bytes so far)",
                    self.irq.domid(),
                    n + 1
                ));
            }
        }
    }
    /// Feeds input bytes, waiting for FIFO room (the console is flow-controlled by us).
    fn receive(&self, data: &[u8], stop: &EventFd) {
        let mut r = self.regs();
        for &b in data {
            while r.rx.len() >= r.rx_cap() {
                if stopping(stop) {
                    return;
                }
                r = self
                    .space
                    .wait_timeout(r, Duration::from_millis(200))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if r.mcr & MCR_LOOP == 0 {
                r.push_rx(b);
            }
            self.update_irq(&mut r);
        }
    }
}

fn stopping(stop: &EventFd) -> bool {
    let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

impl Uart {
    /// A UART raising ISA IRQ `irq` with its console on `spec`; a `file:` console holds at
    /// most [`FILE_CAP_DEFAULT`] bytes.
    pub fn new(spec: &SerialSpec, irq: IrqSink, irq_no: u8) -> Result<Uart, UartError> {
        Uart::with_file_cap(spec, irq, irq_no, FILE_CAP_DEFAULT)
    }

    /// As [`Uart::new`], with a `file:` console capped at `file_cap` bytes (what the file
    /// held when opened counts): a guest cannot fill dom0's disk. Bytes past the cap are
    /// dropped and counted in [`Uart::tx_dropped`], and logged at a rate limit.
    pub fn with_file_cap(
        spec: &SerialSpec,
        irq: IrqSink,
        irq_no: u8,
        file_cap: u64,
    ) -> Result<Uart, UartError> {
        let domid = irq.domid();
        let open = |what: String| {
            move |source| UartError::Open {
                domid,
                what,
                source,
            }
        };
        let mut listener = None;
        let (sink, describe) = match spec {
            SerialSpec::None => (Sink::None, "none".to_string()),
            SerialSpec::File(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(open(format!("file {p}")))?;
                let len = f.metadata().map_err(open(format!("file {p}")))?.len();
                (
                    Sink::File {
                        file: f,
                        len: len.into(),
                        cap: file_cap,
                    },
                    format!("file:{p}"),
                )
            }
            SerialSpec::Pty => {
                let (master, slave, path) = crate::sys::open_pty().map_err(open("pty".into()))?;
                (
                    Sink::Pty {
                        master,
                        _slave: slave,
                    },
                    format!("pty:{path}"),
                )
            }
            SerialSpec::UnixServer(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p).map_err(open(format!("unix socket {p}")))?;
                l.set_nonblocking(true)
                    .map_err(open(format!("unix socket {p}")))?;
                listener = Some(l);
                (Sink::Unix(Mutex::new(None)), format!("unix:{p},server"))
            }
        };
        let regs = Regs {
            ier: 0,
            lcr: 0,
            mcr: MCR_OUT2,
            lsr: LSR_THRE | LSR_TEMT,
            msr: MSR_CTS | MSR_DSR | MSR_DCD,
            scr: 0,
            dll: 12,
            dlm: 0,
            fcr: 0,
            rx: VecDeque::with_capacity(FIFO_LEN),
            thr_pending: false,
            level: false,
        };
        let shared = Arc::new(Shared {
            regs: Mutex::new(regs),
            space: Condvar::new(),
            sink,
            irq,
            irq_no,
            tx_dropped: Default::default(),
            log: RateLog::new(),
        });
        let stop = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| UartError::Open {
                    domid,
                    what: "eventfd".into(),
                    source: e.into(),
                })?,
        );
        let needs_thread = matches!(shared.sink, Sink::Pty { .. }) || listener.is_some();
        let thread = if needs_thread {
            let (sh, st) = (shared.clone(), stop.clone());
            Some(
                std::thread::Builder::new()
                    .name(format!("uart-d{domid}"))
                    .spawn(move || input_loop(&sh, &st, listener))
                    .map_err(open("input thread".into()))?,
            )
        } else {
            None
        };
        tracing::info!(
            domid,
            "16550A UART at {:#x} IRQ {irq_no}, console {describe}",
            COM1_BASE
        );
        Ok(Uart {
            shared,
            stop,
            thread,
            describe,
        })
    }

    /// Where the console goes ("pty:/dev/pts/3", "unix:/path,server", "file:/path").
    pub fn console(&self) -> &str {
        &self.describe
    }

    /// Bytes of output dropped because nobody was reading.
    pub fn tx_dropped(&self) -> u64 {
        self.shared
            .tx_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A read of register `reg` (0..8).
    pub fn read(&mut self, reg: u16) -> u8 {
        let sh = &self.shared;
        let mut r = sh.regs();
        let v = match reg {
            0 if r.lcr & LCR_DLAB != 0 => r.dll,
            0 => {
                let b = r.rx.pop_front().unwrap_or(0);
                if r.rx.is_empty() {
                    r.lsr &= !LSR_DR;
                }
                sh.space.notify_all();
                b
            }
            1 if r.lcr & LCR_DLAB != 0 => r.dlm,
            1 => r.ier,
            2 => {
                let iir = r.iir();
                if iir & 0x0f == IIR_THRI {
                    r.thr_pending = false;
                }
                iir
            }
            3 => r.lcr,
            4 => r.mcr,
            5 => {
                let v = r.lsr;
                r.lsr &= !(LSR_OE | LSR_BI);
                v
            }
            6 => {
                let v = (r.msr & MSR_ANY_DELTA) | r.modem_inputs();
                r.msr &= !MSR_ANY_DELTA;
                v
            }
            7 => r.scr,
            _ => 0xff,
        };
        sh.update_irq(&mut r);
        v
    }

    /// A write of register `reg`.
    pub fn write(&mut self, reg: u16, v: u8) {
        let sh = &self.shared;
        let mut r = sh.regs();
        match reg {
            0 if r.lcr & LCR_DLAB != 0 => r.dll = v,
            0 => {
                if r.mcr & MCR_LOOP != 0 {
                    r.push_rx(v);
                } else {
                    drop(r);
                    sh.transmit(v);
                    r = sh.regs();
                }
                // The byte left at once: THR is empty again.
                r.lsr |= LSR_THRE | LSR_TEMT;
                r.thr_pending = true;
            }
            1 if r.lcr & LCR_DLAB != 0 => r.dlm = v,
            1 => {
                let newly_thri = v & IER_THRI != 0 && r.ier & IER_THRI == 0;
                r.ier = v & 0x0f;
                if newly_thri && r.lsr & LSR_THRE != 0 {
                    r.thr_pending = true;
                }
            }
            2 => {
                if v & 1 != (r.fcr & 1) || v & 2 != 0 {
                    r.rx.clear();
                    r.lsr &= !LSR_DR;
                    sh.space.notify_all();
                }
                r.fcr = v & 0xc9;
            }
            3 => r.lcr = v,
            4 => {
                let before = r.modem_inputs();
                r.mcr = v & 0x1f;
                let after = r.modem_inputs();
                let changed = before ^ after;
                if changed & MSR_CTS != 0 {
                    r.msr |= MSR_DCTS;
                }
                if changed & MSR_DSR != 0 {
                    r.msr |= 0x02;
                }
                if changed & MSR_DCD != 0 {
                    r.msr |= 0x08;
                }
                if before & 0x40 != 0 && after & 0x40 == 0 {
                    r.msr |= 0x04;
                }
            }
            7 => r.scr = v,
            // LSR and MSR are read-only (factory test writes are ignored).
            _ => {}
        }
        sh.update_irq(&mut r);
    }
}

impl Drop for Uart {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        self.shared.space.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn input_loop(sh: &Shared, stop: &EventFd, listener: Option<UnixListener>) {
    let mut buf = [0u8; 256];
    let mut conn: Option<UnixStream> = None;
    loop {
        let src: Option<BorrowedFd<'_>> = match (&sh.sink, &conn, &listener) {
            (Sink::Pty { master, .. }, _, _) => Some(master.as_fd()),
            (_, Some(c), _) => Some(c.as_fd()),
            (_, None, Some(l)) => Some(l.as_fd()),
            _ => None,
        };
        let mut fds = vec![PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
        if let Some(fd) = src {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                sh.log.warn(format_args!(
                    "dom{}: serial console poll: {e}",
                    sh.irq.domid()
                ));
                return;
            }
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        drop(fds);
        match (&sh.sink, &mut conn, &listener) {
            (Sink::Pty { master, .. }, _, _) => match (&*master).read(&mut buf) {
                Ok(n) if n > 0 => sh.receive(&buf[..n], stop),
                Ok(_) | Err(_) => {
                    // EIO while the slave is closed elsewhere; we hold one open, so this is
                    // only EAGAIN after a spurious wakeup.
                }
            },
            (Sink::Unix(out), Some(c), _) => match c.read(&mut buf) {
                Ok(n) if n > 0 => sh.receive(&buf[..n], stop),
                Ok(_) => {
                    conn = None;
                    *out.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    conn = None;
                    *out.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            },
            (Sink::Unix(out), None, Some(l)) => {
                if let Ok((c, _)) = l.accept() {
                    let writer = c.try_clone();
                    if c.set_nonblocking(true).is_ok() {
                        if let Ok(w) = writer {
                            *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
                            conn = Some(c);
                            tracing::info!(
                                domid = sh.irq.domid(),
                                "serial console client connected"
                            );
                        }
                    }
                }
            }
            _ => return,
        }
    }
}
