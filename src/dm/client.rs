//! `domio qmp`: a small QMP client for operators and tests (busybox's nc has no unix
//! sockets): it prints the greeting and every reply, and sends either standard input as it
//! is or, with `--execute`, `qmp_capabilities` followed by the commands given.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

/// Arguments of `domio qmp`.
#[derive(Debug, Args)]
pub struct QmpArgs {
    /// The QMP socket, e.g. /var/run/xen/qmp-libxl-3.
    pub socket: PathBuf,
    /// Commands to run (after qmp_capabilities), e.g. `--execute query-status`; a command may
    /// carry JSON arguments after a space: `--execute 'device_del {"id":"x"}'`. Without any,
    /// standard input is sent as it is.
    #[arg(long, short = 'e')]
    pub execute: Vec<String>,
    /// Seconds to keep reading replies after the last byte was sent.
    #[arg(long, default_value_t = 1.0)]
    pub wait: f64,
}

/// The bytes sent for `--execute` commands.
fn requests(cmds: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut out = b"{\"execute\":\"qmp_capabilities\"}\r\n".to_vec();
    for (i, c) in cmds.iter().enumerate() {
        let (name, args) = match c.split_once(' ') {
            Some((n, a)) => {
                let v: serde_json::Value = serde_json::from_str(a)
                    .with_context(|| format!("the arguments of {n:?} are not JSON: {a}"))?;
                (n, Some(v))
            }
            None => (c.as_str(), None),
        };
        let mut req = serde_json::json!({ "execute": name, "id": i + 1 });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        out.extend_from_slice(req.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    Ok(out)
}

/// Runs `domio qmp`.
pub fn run(a: QmpArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=3600.0).contains(&a.wait) {
        anyhow::bail!("--wait {} is out of range (0 to 3600 seconds)", a.wait);
    }
    let s = UnixStream::connect(&a.socket)
        .with_context(|| format!("connecting to {}", a.socket.display()))?;
    // A read that waits longer than --wait ends the session (once everything was sent).
    s.set_read_timeout(Some(Duration::from_secs_f64(a.wait.max(0.001))))
        .context("setting the read timeout")?;
    let mut w = s.try_clone().context("cloning the socket")?;
    // With --execute the replies to expect are known: the greeting, qmp_capabilities's, and
    // one per command. Standard input's are not: read until the peer is quiet.
    let (expect, sender) = if a.execute.is_empty() {
        let t = std::thread::spawn(move || {
            // A peer that closes early (an oversized request) is not an error of ours.
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut w);
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        (None, Some(t))
    } else {
        w.write_all(&requests(&a.execute)?)
            .context("sending the commands")?;
        (Some(a.execute.len() + 2), None)
    };
    let mut input = BufReader::new(s);
    let mut stdout = std::io::stdout();
    let mut lines = 0;
    let mut errors = 0;
    loop {
        let mut line = Vec::new();
        match input.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                stdout.write_all(&line)?;
                stdout.flush()?;
                lines += 1;
                if serde_json::from_slice::<serde_json::Value>(&line)
                    .is_ok_and(|v| v.get("error").is_some())
                {
                    errors += 1;
                }
                if expect.is_some_and(|e| lines >= e) {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if sender.as_ref().is_none_or(|t| t.is_finished()) {
                    break;
                }
            }
            Err(e) => return Err(e).context("reading replies"),
        }
    }
    if expect.is_some_and(|e| lines < e) {
        anyhow::bail!("{} of {} replies arrived", lines, expect.unwrap_or(0));
    }
    // With --execute, a QMP error reply is a failure of the command asked for.
    if expect.is_some() && errors > 0 {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_execute_builds_negotiation_then_numbered_commands() {
        let b = requests(&["query-status".into(), "device_del {\"id\":\"x\"}".into()]).unwrap();
        let text = String::from_utf8(b).unwrap();
        let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines[0], "{\"execute\":\"qmp_capabilities\"}");
        let v: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(v["execute"], "device_del");
        assert_eq!(v["arguments"]["id"], "x");
        assert_eq!(v["id"], 2);
        assert!(requests(&["cont {oops".into()])
            .unwrap_err()
            .to_string()
            .contains("not JSON"));
    }
}
