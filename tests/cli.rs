//! The command line: bad input gets a clear error naming the problem; probe and demo work
//! on the simulated host.

use std::process::Command;

fn domio() -> Command {
    Command::new(env!("CARGO_BIN_EXE_domio"))
}

fn stderr_of(args: &[&str]) -> (i32, String) {
    let out = domio().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn test_cli_serve_dom0_is_refused_with_reason() {
    let (code, err) = stderr_of(&["serve", "--domid", "0", "--xen", "sim:/nonexistent"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a guest domain id"), "{err}");
}

#[test]
fn test_cli_unknown_xen_target_is_refused_with_reason() {
    let (code, err) = stderr_of(&["serve", "--domid", "3", "--xen", "kvm"]);
    assert_ne!(code, 0);
    assert!(err.contains("expected `linux` or `sim:PATH`"), "{err}");
}

#[test]
fn test_cli_backend_type_not_in_build_is_named() {
    let (code, err) = stderr_of(&[
        "serve",
        "--domid",
        "3",
        "--xen",
        "sim:/nonexistent",
        "--backend-types",
        "console,vkbd",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown backend type \"vkbd\""), "{err}");
    assert!(
        err.contains("vif"),
        "the message lists what is available: {err}"
    );
}

#[test]
fn test_cli_missing_sim_socket_names_the_path() {
    let (code, err) = stderr_of(&[
        "serve",
        "--domid",
        "3",
        "--xen",
        "sim:/nonexistent/xensim.sock",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/xensim.sock"), "{err}");
}

#[test]
fn test_cli_probe_on_sim_passes_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("x.sock");
    let host = xensim::host::Host::new().unwrap();
    let _server = xensim::server::Server::start(host, &sock).unwrap();

    let out = domio()
        .args(["probe", "--xen"])
        .arg(format!("sim:{}", sock.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);

    assert!(
        out.status.success(),
        "probe failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "xenstore-socket",
        "xenstore-xenbus-device",
        "evtchn",
        "gntdev-open",
        "privcmd-foreign-open",
    ] {
        assert!(
            stdout.contains(&format!("PASS {check}")),
            "{check} missing:\n{stdout}"
        );
    }
    assert!(stdout.contains("0 checks failed"), "{stdout}");
}

#[test]
fn test_cli_demo_runs_bounded_and_reports_ok() {
    let out = domio()
        .args(["demo", "--duration", "2.5", "--tick-ms", "200"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);

    assert!(out.status.success(), "demo failed:\n{stdout}");
    assert!(stdout.contains("backend Connected"), "{stdout}");
    assert!(stdout.contains("received input \"ping 1\""), "{stdout}");
    assert!(stdout.contains("closed cleanly=true"), "{stdout}");
    assert!(stdout.contains("disk xvda: connected=true"), "{stdout}");
    assert!(
        stdout.contains("mismatches=0 errors=0 closed cleanly=true"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("rounds verified=0 "),
        "the disk verified no round:\n{stdout}"
    );
    assert!(stdout.contains("result: OK"), "{stdout}");
}
