//! The raw engine through the `Engine` trait, once per mechanism (io_uring, thread pool):
//! data round trips at odd sector offsets, batching, queue depth, the validation rules shared
//! with `null::validate`, flush, FUA, discard, write-zeroes and online resize.

mod engine_common;
use engine_common::{mem, req, seg};

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backends::blk::engine::{
    open_engine, Completion, Engine, EngineOptions, IoOp, IoRequest, IoSeg, Mechanism, RawEngine,
    RawOptions,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

const MIB: u64 = 1 << 20;
const MECHS: [Mechanism; 2] = [Mechanism::IoUring, Mechanism::ThreadPool];

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A file of `size` bytes filled with `pattern(size, 7)`.
fn image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::write(&p, pattern(size as usize, 7)).unwrap();
    p
}

fn open(path: &Path, mech: Mechanism, depth: u32, read_only: bool) -> RawEngine {
    let opts = RawOptions {
        queue_depth: depth,
        mechanism: mech,
        direct: true,
        pool_threads: 2,
        lock: false,
    };
    RawEngine::open(path.to_str().unwrap(), read_only, &opts).unwrap()
}

/// Queues `reqs` (all must fit), kicks once, and waits on the completion fd until every one is
/// reaped. Returns the completions sorted by tag.
fn run(e: &mut dyn Engine, reqs: Vec<IoRequest>) -> Vec<Completion> {
    let n = reqs.len();
    for r in reqs {
        e.queue(r).expect("queue has room");
    }
    e.kick().unwrap();
    wait(e, n)
}

/// Waits on the completion fd until `n` completions are reaped; sorted by tag.
fn wait(e: &mut dyn Engine, n: usize) -> Vec<Completion> {
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
    assert_eq!(e.in_flight(), 0);
    out.sort_by_key(|c| c.tag);
    out
}

fn results(cs: &[Completion]) -> Vec<Result<u64, i32>> {
    cs.iter().map(|c| c.result).collect()
}

fn file_bytes(p: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(p)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

#[test]
fn test_raw_engine_opens_direct_with_requested_mechanism() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), MIB);
        // Act
        let e = open(&p, mech, 8, false);
        // Assert
        assert_eq!(e.uses_io_uring(), mech == Mechanism::IoUring);
        assert!(e.is_direct(), "ext4 allows O_DIRECT: {}", e.info().describe);
        let i = e.info();
        assert_eq!(
            (i.capacity, i.logical_sector, i.physical_sector),
            (MIB, 512, 4096)
        );
        assert_eq!((i.discard, i.secure_discard), (Some(4096), false));
        assert!(i.volatile_cache && !i.read_only);
        assert!(i.describe.contains(p.to_str().unwrap()));
    }
}

#[test]
fn test_raw_engine_odd_sector_multi_segment_write_then_read_round_trips() {
    for mech in MECHS {
        // Arrange: three segments starting at sectors 1, 3 and 0 of their pages.
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 4 * MIB);
        let mut e = open(&p, mech, 8, false);
        let src = mem(3 * 4096);
        let data = pattern(1024 + 2560 + 4096, 99);
        src.write(512, &data[..1024]).unwrap();
        src.write(4096 + 1536, &data[1024..3584]).unwrap();
        src.write(8192, &data[3584..]).unwrap();
        let wsegs = vec![
            seg(&src, 512, 1024, false),
            seg(&src, 4096 + 1536, 2560, false),
            seg(&src, 8192, 4096, false),
        ];
        let off = MIB + 3 * 512;
        // Act: write, then read back into a different layout.
        let w = run(&mut e, vec![req(1, IoOp::Write, off, wsegs, 0)]);
        let dst = mem(3 * 4096);
        let rsegs = vec![
            seg(&dst, 3584, 512, true),
            seg(&dst, 4096 + 512, 7168, true),
        ];
        let r = run(&mut e, vec![req(2, IoOp::Read, off, rsegs, 0)]);
        // Assert
        assert_eq!(results(&w), vec![Ok(7680)], "{mech:?}");
        assert_eq!(results(&r), vec![Ok(7680)], "{mech:?}");
        assert!(w[0].segs.is_empty() && w[0].segs.capacity() >= 3);
        let mut back = vec![0u8; 7680];
        dst.read(3584, &mut back[..512]).unwrap();
        dst.read(4096 + 512, &mut back[512..]).unwrap();
        assert_eq!(back, data, "{mech:?}");
        assert_eq!(file_bytes(&p, off, 7680), data, "{mech:?}");
        assert_eq!(
            file_bytes(&p, off - 512, 512),
            pattern(4 * MIB as usize, 7)[(off - 512) as usize..off as usize],
            "neighbouring sector untouched"
        );
    }
}

#[test]
fn test_raw_engine_batch_of_32_random_writes_reads_back_each() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 4 * MIB);
        let mut e = open(&p, mech, 32, false);
        let m = mem(32 * 4096);
        let blocks: Vec<u64> = (0..32u64).map(|i| (i * 37 + 11) % 1024).collect();
        for i in 0..32 {
            m.write(i * 4096, &pattern(4096, i as u8)).unwrap();
        }
        let writes = (0..32)
            .map(|i| {
                let s = seg(&m, i * 4096, 4096, false);
                req(i as u64, IoOp::Write, blocks[i] * 4096, vec![s], 0)
            })
            .collect();
        // Act
        let w = run(&mut e, writes);
        let back = mem(32 * 4096);
        let reads = (0..32)
            .map(|i| {
                let s = seg(&back, i * 4096, 4096, true);
                req(100 + i as u64, IoOp::Read, blocks[i] * 4096, vec![s], 0)
            })
            .collect();
        let r = run(&mut e, reads);
        // Assert
        assert!(results(&w).iter().all(|r| *r == Ok(4096)), "{mech:?}");
        assert!(results(&r).iter().all(|r| *r == Ok(4096)), "{mech:?}");
        for i in 0..32 {
            let mut b = vec![0u8; 4096];
            back.read(i * 4096, &mut b).unwrap();
            assert_eq!(b, pattern(4096, i as u8), "{mech:?} block {i}");
        }
    }
}

#[test]
fn test_raw_engine_at_queue_depth_returns_request_until_reaped() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), MIB);
        let mut e = open(&p, mech, 4, false);
        for t in 0..4 {
            e.queue(req(t, IoOp::Flush, 0, vec![], 0)).unwrap();
        }
        // Act
        let refused = e.queue(req(9, IoOp::Flush, 0, vec![], 0));
        e.kick().unwrap();
        let done = wait(&mut e, 4);
        let after = run(&mut e, vec![req(10, IoOp::Flush, 0, vec![], 0)]);
        // Assert
        assert_eq!(refused.map_err(|r| r.tag), Err(9), "{mech:?}");
        assert_eq!(results(&done), vec![Ok(0); 4]);
        assert_eq!(results(&after), vec![Ok(0)]);
    }
}

#[test]
fn test_raw_engine_invalid_requests_complete_with_validate_errnos() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), MIB);
        let mut e = open(&p, mech, 8, false);
        let m = mem(8192);
        // Act
        let cs = run(
            &mut e,
            vec![
                req(1, IoOp::Read, MIB - 512, vec![seg(&m, 0, 1024, true)], 0),
                req(2, IoOp::Write, 100, vec![seg(&m, 0, 512, false)], 0),
                req(3, IoOp::Read, 0, vec![seg(&m, 0, 100, true)], 0),
                req(4, IoOp::SecureDiscard, 0, vec![], 4096),
                req(5, IoOp::Discard, u64::MAX - 511, vec![], 512),
                req(6, IoOp::WriteZeroes, 512, vec![], 1000),
            ],
        );
        // Assert
        assert_eq!(
            results(&cs),
            vec![
                Err(libc::EIO),
                Err(libc::EINVAL),
                Err(libc::EINVAL),
                Err(libc::EOPNOTSUPP),
                Err(libc::EIO),
                Err(libc::EINVAL)
            ],
            "{mech:?}"
        );
    }
}

#[test]
fn test_raw_engine_read_only_refuses_writes_with_erofs_and_still_reads() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), MIB);
        let mut e = open(&p, mech, 8, true);
        let m = mem(4096);
        // Act
        let cs = run(
            &mut e,
            vec![
                req(1, IoOp::Write, 0, vec![seg(&m, 0, 512, false)], 0),
                req(2, IoOp::Discard, 0, vec![], 4096),
                req(3, IoOp::WriteZeroes, 0, vec![], 4096),
                req(4, IoOp::Read, 4096, vec![seg(&m, 0, 4096, true)], 0),
            ],
        );
        // Assert
        assert!(e.info().read_only && e.info().discard.is_none());
        assert_eq!(
            results(&cs),
            vec![
                Err(libc::EROFS),
                Err(libc::EROFS),
                Err(libc::EROFS),
                Ok(4096)
            ]
        );
        let mut b = vec![0u8; 4096];
        m.read(0, &mut b).unwrap();
        assert_eq!(b, pattern(MIB as usize, 7)[4096..8192]);
    }
}

#[test]
fn test_raw_engine_discard_reads_zeroes_and_deallocates_blocks() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 4 * MIB);
        File::open(&p).unwrap().sync_all().unwrap();
        let blocks_before = std::fs::metadata(&p).unwrap().blocks();
        let mut e = open(&p, mech, 8, false);
        // Act
        let d = run(&mut e, vec![req(1, IoOp::Discard, MIB, vec![], MIB)]);
        let m = mem(8192);
        let r = run(
            &mut e,
            vec![req(
                2,
                IoOp::Read,
                MIB + 4096,
                vec![seg(&m, 0, 8192, true)],
                0,
            )],
        );
        // Assert
        assert_eq!(results(&d), vec![Ok(MIB)], "{mech:?}");
        assert_eq!(results(&r), vec![Ok(8192)]);
        let mut b = vec![1u8; 8192];
        m.read(0, &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == 0),
            "{mech:?}: discarded range reads zeroes"
        );
        let blocks_after = std::fs::metadata(&p).unwrap().blocks();
        assert!(
            blocks_before - blocks_after >= MIB / 512,
            "{mech:?}: {blocks_before} -> {blocks_after} 512-byte blocks"
        );
        let f = File::open(&p).unwrap();
        let hole = nix::unistd::lseek(
            std::os::fd::AsRawFd::as_raw_fd(&f.as_fd()),
            0,
            nix::unistd::Whence::SeekHole,
        )
        .unwrap();
        assert_eq!(
            hole as u64, MIB,
            "{mech:?}: first hole is the discarded range"
        );
        assert_eq!(
            file_bytes(&p, 2 * MIB, 16),
            pattern(4 * MIB as usize, 7)[2 << 20..(2 << 20) + 16]
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 * MIB, "size kept");
    }
}

#[test]
fn test_raw_engine_write_zeroes_zeroes_range_and_keeps_neighbours() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), MIB);
        let mut e = open(&p, mech, 8, false);
        // Act
        let z = run(
            &mut e,
            vec![req(1, IoOp::WriteZeroes, 1536, vec![], 8192 + 512)],
        );
        // Assert
        assert_eq!(results(&z), vec![Ok(8704)], "{mech:?}");
        let all = pattern(MIB as usize, 7);
        assert!(file_bytes(&p, 1536, 8704).iter().all(|&b| b == 0));
        assert_eq!(file_bytes(&p, 1024, 512), all[1024..1536]);
        assert_eq!(file_bytes(&p, 10240, 512), all[10240..10752]);
    }
}

#[test]
fn test_raw_engine_fua_write_and_flush_complete_with_data_in_file() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), MIB);
        let mut e = open(&p, mech, 8, false);
        let m = mem(4096);
        m.write(0, &pattern(4096, 42)).unwrap();
        let mut w = req(1, IoOp::Write, 8192, vec![seg(&m, 0, 4096, false)], 0);
        w.fua = true;
        // Act
        let cs = run(&mut e, vec![w, req(2, IoOp::Flush, 0, vec![], 0)]);
        // Assert
        assert_eq!(results(&cs), vec![Ok(4096), Ok(0)], "{mech:?}");
        assert_eq!(file_bytes(&p, 8192, 4096), pattern(4096, 42));
    }
}

#[test]
fn test_raw_engine_grown_file_refresh_capacity_sees_new_size() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), MIB);
        let mut e = open(&p, mech, 8, false);
        let m = mem(4096);
        let before = run(
            &mut e,
            vec![req(1, IoOp::Write, MIB, vec![seg(&m, 0, 4096, false)], 0)],
        );
        // Act
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(2 * MIB)
            .unwrap();
        let cap = e.refresh_capacity().unwrap();
        let after = run(
            &mut e,
            vec![req(2, IoOp::Write, MIB, vec![seg(&m, 0, 4096, false)], 0)],
        );
        // Assert
        assert_eq!(results(&before), vec![Err(libc::EIO)]);
        assert_eq!((cap, e.info().capacity), (2 * MIB, 2 * MIB));
        assert_eq!(results(&after), vec![Ok(4096)], "{mech:?}");
    }
}

#[test]
fn test_raw_engine_dropped_with_requests_in_flight_waits_and_keeps_memory_valid() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 4 * MIB);
        let mut e = open(&p, mech, 32, false);
        let m = mem(32 * 4096);
        for i in 0..32 {
            let s = seg(&m, i * 4096, 4096, true);
            e.queue(req(i as u64, IoOp::Read, i as u64 * 65536, vec![s], 0))
                .unwrap();
        }
        e.kick().unwrap();
        // Act
        drop(e);
        // Assert: the reads that ran filled the buffer correctly, none wrote elsewhere.
        assert_eq!(Arc::strong_count(&m), 1, "{mech:?}: every segment released");
    }
}

#[test]
fn test_open_engine_env_var_forces_thread_pool_and_formats_dispatch() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), MIB);
    let params = format!("aio:{}", p.display());
    std::env::set_var("DOMIO_BLK_MECHANISM", "thread-pool");
    // Act
    let pool = open_engine(&params, false, &EngineOptions::default()).unwrap();
    std::env::set_var("DOMIO_BLK_MECHANISM", "io_uring");
    let ring = open_engine(&params, false, &EngineOptions::default()).unwrap();
    std::env::remove_var("DOMIO_BLK_MECHANISM");
    let null = open_engine("null:1M", true, &EngineOptions::default()).unwrap();
    let not_qcow2 = open_engine(
        &format!("qcow2:{}", p.display()),
        false,
        &EngineOptions::default(),
    );
    // Assert
    assert!(
        pool.info().describe.starts_with("raw thread-pool"),
        "{}",
        pool.info().describe
    );
    assert!(
        ring.info().describe.starts_with("raw io_uring"),
        "{}",
        ring.info().describe
    );
    assert_eq!((null.info().capacity, null.info().read_only), (MIB, true));
    let err = not_qcow2.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains(p.to_str().unwrap()) && err.contains("not a qcow2"),
        "{err}"
    );
}

#[test]
fn test_raw_engine_request_with_more_segments_than_iov_max_transfers_all() {
    for mech in MECHS {
        // Arrange: 1100 one-sector segments (IOV_MAX is 1024), each at an odd sector.
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 2 * MIB);
        let mut e = open(&p, mech, 4, false);
        let n = 1100;
        let src = mem(n * 1024);
        let data = pattern(n * 512, 5);
        let segs: Vec<IoSeg> = (0..n)
            .map(|i| {
                src.write(i * 1024 + 512, &data[i * 512..(i + 1) * 512])
                    .unwrap();
                seg(&src, i * 1024 + 512, 512, false)
            })
            .collect();
        let dst = mem(n * 512);
        // Act
        let w = run(&mut e, vec![req(1, IoOp::Write, 4096, segs, 0)]);
        let r = run(
            &mut e,
            vec![req(
                2,
                IoOp::Read,
                4096,
                vec![seg(&dst, 0, n * 512, true)],
                0,
            )],
        );
        // Assert
        assert_eq!(results(&w), vec![Ok(n as u64 * 512)], "{mech:?}");
        assert_eq!(results(&r), vec![Ok(n as u64 * 512)], "{mech:?}");
        let mut back = vec![0u8; n * 512];
        dst.read(0, &mut back).unwrap();
        assert_eq!(back, data, "{mech:?}");
        assert_eq!(file_bytes(&p, 4096, n * 512), data, "{mech:?}");
    }
}

#[test]
fn test_raw_engine_buffered_option_round_trips_without_o_direct() {
    for mech in MECHS {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), MIB);
        let opts = RawOptions {
            queue_depth: 4,
            mechanism: mech,
            direct: false,
            pool_threads: 1,
            lock: false,
        };
        let mut e = RawEngine::open(p.to_str().unwrap(), false, &opts).unwrap();
        let m = mem(4096);
        m.write(1024, &pattern(1024, 3)).unwrap();
        // Act
        let w = run(
            &mut e,
            vec![req(
                1,
                IoOp::Write,
                512,
                vec![seg(&m, 1024, 1024, false)],
                0,
            )],
        );
        // Assert
        assert!(!e.is_direct() && e.info().describe.contains("buffered"));
        assert_eq!(e.direct_alignment(), (1, 1));
        assert_eq!(results(&w), vec![Ok(1024)], "{mech:?}");
        assert_eq!(file_bytes(&p, 512, 1024), pattern(1024, 3));
    }
}

#[test]
fn test_open_engine_directory_or_missing_path_errors_name_path_and_problem() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let o = EngineOptions::default();
    // Act
    let is_dir = open_engine(&format!("aio:{d}"), false, &o).err();
    let missing = open_engine(&format!("aio:{d}/none.img"), false, &o).err();
    // Assert
    let e = is_dir.map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains(&d) && e.contains("not a regular file"), "{e}");
    let e = missing.map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("none.img") && e.contains("No such file"), "{e}");
}

#[test]
fn test_raw_engine_with_locks_refuses_and_is_refused_by_qemu() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    // Arrange: qemu-io holds one image open for writing; it has opened it once it answers a
    // command.
    let dir = tempfile::tempdir().unwrap();
    let held = image(dir.path(), MIB);
    let mine = dir.path().join("mine.img");
    std::fs::write(&mine, vec![0u8; MIB as usize]).unwrap();
    let mut q = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(&held)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-io (Debian package qemu-utils)");
    let mut stdin = q.stdin.take().unwrap();
    writeln!(stdin, "read 0 512").unwrap();
    let mut line = String::new();
    BufReader::new(q.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let opts = RawOptions {
        lock: true,
        ..RawOptions::default()
    };
    // Act
    let refused = RawEngine::open(held.to_str().unwrap(), false, &opts).err();
    let e = RawEngine::open(mine.to_str().unwrap(), false, &opts).unwrap();
    let qemu_refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(&mine)
        .output()
        .unwrap();
    drop(stdin);
    q.wait().unwrap();
    drop(e);
    // Assert
    assert!(line.contains("read 512/512"), "qemu-io answered: {line}");
    let msg = refused.map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("held") || msg.contains("disk.img"), "{msg}");
    assert!(msg.contains("in use by another process"), "{msg}");
    assert!(!qemu_refused.status.success());
    assert!(String::from_utf8_lossy(&qemu_refused.stderr).contains("lock"));
}

/// Reads of `n` 4 KiB blocks (block `i` into page `i` of `buf`), tags `base..base + n`.
fn block_reads(buf: &Arc<xen::SharedMem>, base: u64, n: usize) -> Vec<IoRequest> {
    (0..n)
        .map(|i| {
            let off = (i as u64) * 4096;
            req(
                base + i as u64,
                IoOp::Read,
                off,
                vec![seg(buf, i * 4096, 4096, true)],
                4096,
            )
        })
        .collect()
}

#[test]
fn test_raw_engine_io_uring_defers_completion_work_where_the_kernel_can() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), MIB);
    let kernel_has_it = {
        let mut b = io_uring::IoUring::<io_uring::squeue::Entry>::builder();
        b.setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .setup_defer_taskrun();
        b.build(8).is_ok()
    };
    // Act
    let e = open(&p, Mechanism::IoUring, 8, true);
    // Assert
    assert_eq!(e.uring_deferred(), kernel_has_it, "{}", e.info().describe);
    if kernel_has_it {
        assert!(e.info().describe.starts_with("raw io_uring(deferred)"));
    }
}

#[test]
fn test_raw_engine_io_uring_keeps_working_when_another_thread_takes_it_over() {
    // Arrange: opened on this thread (as at probe), used by one thread, then by another (as a
    // virtio queue thread after a reset). A deferred ring answers only the thread that
    // enabled it, so each new user must get a ring of its own.
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), MIB);
    let expected = pattern(MIB as usize, 7);
    let mut e = open(&p, Mechanism::IoUring, 16, true);
    for round in 0..3u64 {
        // Act
        let (got, back) = std::thread::spawn(move || {
            let buf = mem(16 * 4096);
            let cs = run(&mut e, block_reads(&buf, round * 100, 16));
            let mut data = vec![0u8; 16 * 4096];
            buf.read(0, &mut data).unwrap();
            ((results(&cs), data), e)
        })
        .join()
        .unwrap();
        e = back;
        // Assert
        assert_eq!(got.0, vec![Ok(4096); 16], "round {round}");
        assert!(
            got.1 == expected[..16 * 4096],
            "round {round}: data differs"
        );
    }
}

#[test]
fn test_raw_engine_io_uring_taken_over_with_requests_in_flight_fails_them_and_goes_on() {
    // Arrange: a thread queues and kicks reads, then hands the engine on without reaping (a
    // virtio reset whose drain gave up) and exits.
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), MIB);
    let expected = pattern(MIB as usize, 7);
    let e = open(&p, Mechanism::IoUring, 32, true);
    let deferred = e.uring_deferred();
    let first = mem(16 * 4096);
    let f2 = first.clone();
    let mut e = std::thread::spawn(move || {
        let mut e = e;
        for r in block_reads(&f2, 0, 16) {
            e.queue(r).unwrap();
        }
        e.kick().unwrap();
        e
    })
    .join()
    .unwrap();
    // Act: this thread runs reads of its own and reaps everything.
    let second = mem(16 * 4096);
    for r in block_reads(&second, 100, 16) {
        e.queue(r).unwrap();
    }
    e.kick().unwrap();
    let cs = wait(&mut e, 32);
    // Assert: the old thread's reads are written off with EIO where its ring could only be
    // reaped by it (deferred), else they finish; this thread's reads finish with the data.
    let tags: Vec<u64> = cs.iter().map(|c| c.tag).collect();
    let want: Vec<u64> = (0..16).chain(100..116).collect();
    assert_eq!(tags, want);
    let old = if deferred { Err(libc::EIO) } else { Ok(4096) };
    assert_eq!(results(&cs[..16]), vec![old; 16]);
    assert_eq!(results(&cs[16..]), vec![Ok(4096); 16]);
    let mut data = vec![0u8; 16 * 4096];
    second.read(0, &mut data).unwrap();
    assert!(data == expected[..16 * 4096], "data differs");
    drop(e);
}
