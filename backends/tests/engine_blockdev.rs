//! The raw engine on block devices (loop devices over files in a tempdir): sizes and sector
//! sizes from the ioctls, round trips, BLKDISCARD, write-zeroes, BLKSECDISCARD's errno, and a
//! resize seen by `refresh_capacity`. Needs root and /dev/loop-control; without them each test
//! says so on stderr and passes without checking anything.

mod engine_common;
use engine_common::{mem, req, seg};

use std::path::{Path, PathBuf};
use std::process::Command;

use backends::blk::engine::{
    Completion, Engine, IoOp, IoRequest, Mechanism, RawEngine, RawOptions,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

const MIB: u64 = 1 << 20;

/// A loop device, detached on drop.
struct Loop {
    dev: PathBuf,
    backing: PathBuf,
}

impl Loop {
    fn new(dir: &Path, size: u64, sector: u32) -> Option<Loop> {
        let backing = dir.join("loop.img");
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&backing, data).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show", "--sector-size", &sector.to_string()])
            .arg(&backing)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIP: no loop device ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Some(Loop { dev, backing })
    }

    fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn run(e: &mut dyn Engine, reqs: Vec<IoRequest>) -> Vec<Result<u64, i32>> {
    let n = reqs.len();
    for r in reqs {
        e.queue(r).expect("queue has room");
    }
    e.kick().unwrap();
    let mut out: Vec<Completion> = Vec::new();
    while out.len() < n {
        let mut fds = [PollFd::new(e.completion_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(10_000u16)).unwrap();
        assert!(ready > 0, "no completion within 10 s");
        e.reap(&mut out).unwrap();
    }
    out.sort_by_key(|c| c.tag);
    out.iter().map(|c| c.result).collect()
}

fn open(dev: &str, mech: Mechanism) -> RawEngine {
    let opts = RawOptions {
        queue_depth: 8,
        mechanism: mech,
        direct: true,
        pool_threads: 2,
        lock: false,
    };
    RawEngine::open(dev, false, &opts).unwrap()
}

#[test]
fn test_raw_engine_loop_device_info_round_trip_discard_and_zeroes() {
    for mech in [Mechanism::IoUring, Mechanism::ThreadPool] {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let Some(lo) = Loop::new(dir.path(), 4 * MIB, 512) else {
            return;
        };
        let mut e = open(lo.path(), mech);
        let m = mem(3 * 4096);
        m.fill(512, 3072, 0xC3).unwrap();
        // Act
        let w = run(
            &mut e,
            vec![req(
                1,
                IoOp::Write,
                1536,
                vec![seg(&m, 512, 3072, false)],
                0,
            )],
        );
        m.fill(0, 3 * 4096, 0).unwrap();
        let r = run(
            &mut e,
            vec![req(
                2,
                IoOp::Read,
                1536,
                vec![seg(&m, 4096 + 1024, 3072, true)],
                0,
            )],
        );
        let d = run(
            &mut e,
            vec![
                req(3, IoOp::Discard, MIB, vec![], MIB),
                req(4, IoOp::WriteZeroes, 3 * MIB, vec![], 65536),
                req(5, IoOp::SecureDiscard, 0, vec![], 4096),
                req(6, IoOp::Flush, 0, vec![], 0),
            ],
        );
        drop(e);
        // Assert
        let info = open(lo.path(), mech).info().clone();
        assert_eq!((info.capacity, info.logical_sector), (4 * MIB, 512));
        assert!(info.describe.contains("blockdev") && info.describe.contains("O_DIRECT"));
        assert_eq!((w, r), (vec![Ok(3072)], vec![Ok(3072)]), "{mech:?}");
        let mut b = vec![0u8; 3072];
        m.read(4096 + 1024, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xC3));
        assert_eq!(d[0], Ok(MIB), "{mech:?} BLKDISCARD");
        assert_eq!(d[1], Ok(65536), "{mech:?} write zeroes");
        // Loop devices have no secure erase: the kernel's errno comes back.
        assert_eq!(d[2], Err(libc::EOPNOTSUPP), "{mech:?} BLKSECDISCARD");
        assert_eq!(d[3], Ok(0));
        let disk = std::fs::read(&lo.backing).unwrap();
        assert!(disk[1536..4608].iter().all(|&x| x == 0xC3));
        assert!(disk[MIB as usize..2 * MIB as usize].iter().all(|&x| x == 0));
        assert!(disk[3 * MIB as usize..3 * MIB as usize + 65536]
            .iter()
            .all(|&x| x == 0));
        assert_eq!(disk[2 * MIB as usize + 1], ((2 * MIB + 1) % 251) as u8);
    }
}

#[test]
fn test_raw_engine_4k_sector_loop_device_refuses_512_byte_requests_with_einval() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let Some(lo) = Loop::new(dir.path(), 2 * MIB, 4096) else {
        return;
    };
    let mut e = open(lo.path(), Mechanism::IoUring);
    let m = mem(8192);
    // Act
    let r = run(
        &mut e,
        vec![
            req(1, IoOp::Read, 512, vec![seg(&m, 0, 4096, true)], 0),
            req(2, IoOp::Read, 4096, vec![seg(&m, 4096, 4096, true)], 0),
        ],
    );
    // Assert
    assert_eq!(e.info().logical_sector, 4096);
    assert_eq!(r, vec![Err(libc::EINVAL), Ok(4096)]);
}

#[test]
fn test_raw_engine_loop_device_grown_refresh_capacity_sees_blkgetsize64() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let Some(lo) = Loop::new(dir.path(), MIB, 512) else {
        return;
    };
    let mut e = open(lo.path(), Mechanism::ThreadPool);
    // Act
    std::fs::File::options()
        .write(true)
        .open(&lo.backing)
        .unwrap()
        .set_len(3 * MIB)
        .unwrap();
    let st = Command::new("losetup")
        .arg("-c")
        .arg(&lo.dev)
        .status()
        .unwrap();
    let cap = e.refresh_capacity().unwrap();
    // Assert
    assert!(st.success());
    assert_eq!((cap, e.info().capacity), (3 * MIB, 3 * MIB));
}
