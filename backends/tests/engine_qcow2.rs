//! The qcow2 engine against qemu-img (Debian qemu-utils): domio writes into an overlay over a
//! backing chain, the bases stay byte-identical, `qemu-img check` finds the result consistent
//! and `qemu-img compare` finds exactly the guest's writes.

mod engine_common;
use engine_common::{mem, req, seg};

use std::path::{Path, PathBuf};
use std::process::Command;

use backends::blk::engine::{
    open_engine, Completion, Engine, EngineOptions, ImageFormat, IoOp, IoRequest, Qcow2Engine,
    Qcow2Options,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 10) as u8)
        .collect()
}

fn run(e: &mut dyn Engine, reqs: Vec<IoRequest>) -> Vec<Completion> {
    let n = reqs.len();
    for r in reqs {
        e.queue(r).expect("queue has room");
    }
    e.kick().unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let mut fds = [PollFd::new(e.completion_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(10_000u16)).unwrap();
        assert!(
            ready > 0,
            "no completion within 10 s ({} of {n})",
            out.len()
        );
        e.reap(&mut out).unwrap();
    }
    out.sort_by_key(|c| c.tag);
    out
}

fn results(cs: &[Completion]) -> Vec<Result<u64, i32>> {
    cs.iter().map(|c| c.result).collect()
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    tool("qemu-img", args)
}

fn qemu_io(args: &[&str]) -> (bool, String) {
    tool("qemu-io", args)
}

fn tool(name: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} (Debian package qemu-utils) must be installed: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// base.raw (pattern) <- mid.qcow2 (one written cluster) <- top.qcow2 (empty). Returns
/// (base, mid, top) and the raw image the chain reads as.
fn chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf, Vec<u8>) {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    let mut expect = pattern(SIZE as usize, 1);
    std::fs::write(&base, &expect).unwrap();
    let ok = |r: (bool, String)| assert!(r.0, "{}", r.1);
    ok(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&mid),
    ]));
    ok(qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x33 2M 64k",
        s(&mid),
    ]));
    expect[2 << 20..(2 << 20) + 65536].fill(0x33);
    ok(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&mid),
        "-F",
        "qcow2",
        s(&top),
    ]));
    (base, mid, top, expect)
}

fn open(top: &Path, read_only: bool) -> Box<dyn Engine> {
    open_engine(
        &format!("qcow2:{}", s(top)),
        read_only,
        &EngineOptions {
            threads: 2,
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn test_qcow2_engine_reads_through_backing_chain() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top, expect) = chain(dir.path());
    let mut e = open(&top, true);
    let m = mem(3 * 4096);
    // Act: straddle the mid image's cluster at 2 MiB, at an odd sector of the page.
    let off = (2 << 20) - 1024;
    let cs = run(
        &mut *e,
        vec![req(1, IoOp::Read, off, vec![seg(&m, 512, 8192, true)], 0)],
    );
    // Assert
    assert_eq!(results(&cs), vec![Ok(8192)]);
    let mut b = vec![0u8; 8192];
    m.read(512, &mut b).unwrap();
    assert_eq!(b, expect[off as usize..off as usize + 8192]);
    assert_eq!(e.info().capacity, SIZE);
    assert!(
        e.info().describe.contains("mid.qcow2"),
        "{}",
        e.info().describe
    );
}

#[test]
fn test_qcow2_engine_overlay_writes_pass_qemu_img_check_and_compare_bases_unchanged() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top, mut expect) = chain(dir.path());
    let base_before = std::fs::read(&base).unwrap();
    let mid_before = std::fs::read(&mid).unwrap();
    let mut e = open(&top, false);
    let m = mem(4 * 4096);
    let data = pattern(1536 + 4096 + 512, 77);
    m.write(512, &data[..1536]).unwrap();
    m.write(4096, &data[1536..5632]).unwrap();
    m.write(3 * 4096 + 3584, &data[5632..]).unwrap();
    let wsegs = vec![
        seg(&m, 512, 1536, false),
        seg(&m, 4096, 4096, false),
        seg(&m, 3 * 4096 + 3584, 512, false),
    ];
    let woff = (2 << 20) - 2560;
    let mut fua = req(2, IoOp::Write, 512, vec![seg(&m, 4096, 4096, false)], 0);
    fua.fua = true;
    // Act
    let w = run(
        &mut *e,
        vec![
            req(1, IoOp::Write, woff, wsegs, 0),
            fua,
            req(3, IoOp::WriteZeroes, 3 * MIB, vec![], 128 * 1024),
            req(4, IoOp::Discard, (2 << 20) + 65536, vec![], 65536),
        ],
    );
    let f = run(&mut *e, vec![req(5, IoOp::Flush, 0, vec![], 0)]);
    let back = mem(8192);
    let r = run(
        &mut *e,
        vec![req(6, IoOp::Read, woff, vec![seg(&back, 0, 6144, true)], 0)],
    );
    drop(e);
    // Assert
    assert_eq!(
        results(&w),
        vec![Ok(6144), Ok(4096), Ok(128 * 1024), Ok(65536)]
    );
    assert_eq!(results(&f), vec![Ok(0)]);
    assert_eq!(results(&r), vec![Ok(6144)]);
    let mut b = vec![0u8; 6144];
    back.read(0, &mut b).unwrap();
    assert_eq!(b, data);
    expect[woff as usize..woff as usize + 6144].copy_from_slice(&data);
    expect[512..512 + 4096].copy_from_slice(&data[1536..5632]);
    expect[3 << 20..(3 << 20) + 128 * 1024].fill(0);
    expect[(2 << 20) + 65536..(2 << 20) + 131072].fill(0);
    let want = dir.path().join("expect.raw");
    std::fs::write(&want, &expect).unwrap();
    let (ok, text) = qemu_img(&["check", "-f", "qcow2", s(&top)]);
    assert!(ok, "qemu-img check: {text}");
    let (ok, text) = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&top), s(&want)]);
    assert!(ok, "qemu-img compare: {text}");
    assert!(std::fs::read(&base).unwrap() == base_before, "base changed");
    assert!(std::fs::read(&mid).unwrap() == mid_before, "mid changed");
}

#[test]
fn test_qcow2_engine_discard_over_allocated_clusters_frees_them_and_reads_zeroes() {
    // Arrange: a standalone image with 1 MiB written.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "4M"]).0);
    let (ok, t) = qemu_io(&["-f", "qcow2", "-c", "write -P 0x44 0 1M", s(&img)]);
    assert!(ok, "{t}");
    let mut e = open(&img, false);
    // Act
    let d = run(&mut *e, vec![req(1, IoOp::Discard, 0, vec![], MIB)]);
    let m = mem(4096);
    let r = run(
        &mut *e,
        vec![req(2, IoOp::Read, 8192, vec![seg(&m, 0, 4096, true)], 0)],
    );
    drop(e);
    // Assert
    assert_eq!(results(&d), vec![Ok(MIB)]);
    assert_eq!(results(&r), vec![Ok(4096)]);
    let mut b = vec![1u8; 4096];
    m.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    let (ok, map) = qemu_img(&["map", "--output=json", "-f", "qcow2", s(&img)]);
    assert!(ok, "{map}");
    assert!(
        !map.contains("\"data\": true"),
        "no cluster may stay allocated: {map}"
    );
    let (ok, text) = qemu_img(&["check", "-f", "qcow2", s(&img)]);
    assert!(ok, "qemu-img check: {text}");
}

#[test]
fn test_qcow2_engine_read_only_and_invalid_requests_complete_with_errnos() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top, _) = chain(dir.path());
    let mut ro = open(&top, true);
    let mut rw = open(&top, false);
    let m = mem(4096);
    // Act
    let a = run(
        &mut *ro,
        vec![
            req(1, IoOp::Write, 0, vec![seg(&m, 0, 512, false)], 0),
            req(2, IoOp::Discard, 0, vec![], 65536),
        ],
    );
    drop(ro);
    let b = run(
        &mut *rw,
        vec![
            req(1, IoOp::Read, SIZE - 512, vec![seg(&m, 0, 1024, true)], 0),
            req(2, IoOp::Write, 3, vec![seg(&m, 0, 512, false)], 0),
            req(3, IoOp::SecureDiscard, 0, vec![], 65536),
        ],
    );
    // Assert
    assert_eq!(results(&a), vec![Err(libc::EROFS), Err(libc::EROFS)]);
    assert_eq!(
        results(&b),
        vec![Err(libc::EIO), Err(libc::EINVAL), Err(libc::EOPNOTSUPP)]
    );
}

#[test]
fn test_qcow2_engine_open_bad_image_names_path_and_problem() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("plain.img");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    // Act
    let e = Qcow2Engine::open(s(&raw), false, &Qcow2Options::default())
        .unwrap_err()
        .to_string();
    let missing = Qcow2Engine::open("/nonexistent/x.qcow2", false, &Qcow2Options::default())
        .unwrap_err()
        .to_string();
    // Assert
    assert!(e.contains(s(&raw)) && e.contains("not a qcow2"), "{e}");
    assert!(missing.contains("/nonexistent/x.qcow2"), "{missing}");
}

#[test]
fn test_open_engine_format_override_opens_bare_path_as_qcow2() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("o.qcow2");
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).0);
    let opts = EngineOptions {
        format: Some(ImageFormat::Qcow2),
        ..EngineOptions::default()
    };
    // Act
    let bare = open_engine(s(&img), true, &EngineOptions::default()).unwrap();
    let forced = open_engine(s(&img), true, &opts).unwrap();
    // Assert: no probing, a bare path is raw (the qcow2 file's own bytes) unless told.
    assert!(
        bare.info().describe.starts_with("raw"),
        "{}",
        bare.info().describe
    );
    assert_ne!(bare.info().capacity, MIB);
    assert!(
        forced.info().describe.starts_with("qcow2"),
        "{}",
        forced.info().describe
    );
    assert_eq!(forced.info().capacity, MIB);
}

#[test]
fn test_qcow2_engine_32_concurrent_writes_on_4_workers_stay_consistent() {
    // Arrange: an overlay over a raw base; 32 writes of 12 KiB in one batch, on 4 workers.
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top, mut expect) = chain(dir.path());
    let mut e = open_engine(
        &format!("qcow2:{}", s(&top)),
        false,
        &EngineOptions {
            threads: 4,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let m = mem(32 * 3 * 4096);
    // Pairs of writes share a (backing-only, so copy-on-write) 64 KiB cluster without
    // overlapping: the case where concurrent allocation must be serialised.
    let offsets: Vec<u64> = (0..32u64)
        .map(|i| (i / 2) * 196_608 + (i % 2) * 32_768 + (i / 2) * 512)
        .collect();
    let reqs = (0..32usize)
        .map(|i| {
            let d = pattern(12288, i as u8);
            m.write(i * 12288, &d).unwrap();
            expect[offsets[i] as usize..offsets[i] as usize + 12288].copy_from_slice(&d);
            req(
                i as u64,
                IoOp::Write,
                offsets[i],
                vec![seg(&m, i * 12288, 12288, false)],
                0,
            )
        })
        .collect();
    // Act
    let w = run(&mut *e, reqs);
    let f = run(&mut *e, vec![req(99, IoOp::Flush, 0, vec![], 0)]);
    drop(e);
    // Assert
    assert!(
        results(&w).iter().all(|r| *r == Ok(12288)),
        "{:?}",
        results(&w)
    );
    assert_eq!(results(&f), vec![Ok(0)]);
    let want = dir.path().join("expect.raw");
    std::fs::write(&want, &expect).unwrap();
    let (ok, text) = qemu_img(&["check", "-f", "qcow2", s(&top)]);
    assert!(ok, "qemu-img check: {text}");
    let (ok, text) = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&top), s(&want)]);
    assert!(ok, "qemu-img compare: {text}");
}

#[test]
fn test_qcow2_engine_with_locks_refuses_qemu_writers_of_overlay_and_base() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top, _) = chain(dir.path());
    let opts = EngineOptions {
        lock: true,
        ..EngineOptions::default()
    };
    let e = open_engine(&format!("qcow2:{}", s(&top)), false, &opts).unwrap();
    // Act
    let top_w = qemu_io(&["-f", "qcow2", "-c", "write 0 512", s(&top)]);
    let mid_w = qemu_io(&["-f", "qcow2", "-c", "write 0 512", s(&mid)]);
    let base_w = qemu_io(&["-f", "raw", "-c", "write 0 512", s(&base)]);
    drop(e);
    let after = qemu_io(&["-f", "qcow2", "-c", "write 0 512", s(&top)]);
    // Assert
    for (what, (ok, text)) in [("top", top_w), ("mid", mid_w), ("base", base_w)] {
        assert!(!ok && text.contains("lock"), "{what}: {text}");
    }
    assert!(after.0, "lock released with the engine: {}", after.1);
}

#[test]
fn test_qcow2_engine_v2_image_writes_zeroes_by_hand_and_refuses_discard() {
    // Arrange: qcow2 version 2 (compat=0.10) has no zero clusters.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v2.qcow2");
    let (ok, t) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&img),
        "4M",
    ]);
    assert!(ok, "{t}");
    let (ok, t) = qemu_io(&["-f", "qcow2", "-c", "write -P 0x55 0 2M", s(&img)]);
    assert!(ok, "{t}");
    let mut e = open(&img, false);
    // Act
    let z = run(
        &mut *e,
        vec![
            req(1, IoOp::WriteZeroes, 4096, vec![], MIB + 512 * 3),
            req(2, IoOp::Discard, 0, vec![], 65536),
        ],
    );
    let discard = e.info().discard;
    drop(e);
    // Assert
    assert_eq!(results(&z), vec![Ok(MIB + 1536), Err(libc::EOPNOTSUPP)]);
    assert_eq!(discard, None, "no discard on qcow2 v2");
    let mut expect = vec![0u8; SIZE as usize];
    expect[..2 << 20].fill(0x55);
    expect[4096..4096 + MIB as usize + 1536].fill(0);
    let want = dir.path().join("expect.raw");
    std::fs::write(&want, &expect).unwrap();
    let (ok, text) = qemu_img(&["check", "-f", "qcow2", s(&img)]);
    assert!(ok, "qemu-img check: {text}");
    let (ok, text) = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&img), s(&want)]);
    assert!(ok, "qemu-img compare: {text}");
}
