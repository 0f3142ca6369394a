//! Throughput of the raw engine's mechanisms: 4 KiB random reads at queue depth 32 with
//! O_DIRECT, the same load as
//! `fio --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32`.
//!
//! Ignored by default (it measures, it does not check). Run:
//! `cargo test --release -p backends --test engine_bench -- --ignored --nocapture`
//! with `DOMIO_BENCH_FILE=/path` (an allocated file, not sparse), `DOMIO_BENCH_SECS`, and
//! `DOMIO_BENCH_QCOW2=/path.qcow2` to measure the qcow2 engine too.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backends::blk::engine::{
    Completion, Engine, IoMem, IoOp, IoRequest, IoSeg, Mechanism, Qcow2Engine, Qcow2Options,
    RawEngine, RawOptions,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xen::SharedMem;

const QD: usize = 32;
const BS: usize = 4096;

/// xorshift64: cheap, deterministic offsets.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn raw(path: &str, mech: Mechanism, threads: usize) -> Box<dyn Engine> {
    let opts = RawOptions {
        queue_depth: QD as u32,
        mechanism: mech,
        direct: true,
        pool_threads: threads,
        lock: false,
    };
    let e = RawEngine::open(path, true, &opts).unwrap();
    assert!(e.is_direct(), "benchmark needs O_DIRECT");
    println!(
        "O_DIRECT alignment (memory, offset): {:?}",
        e.direct_alignment()
    );
    Box::new(e)
}

/// CPU time this process has used (user + system), from /proc/self/stat, in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

fn bench(mut e: Box<dyn Engine>, secs: u64) -> f64 {
    let blocks = e.info().capacity / BS as u64;
    let mem: Arc<SharedMem> = Arc::new(SharedMem::anonymous(QD * BS).unwrap());
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let submit = |e: &mut dyn Engine, slot: usize, mut segs: Vec<IoSeg>, rng: &mut u64| {
        let m: Arc<dyn IoMem> = mem.clone();
        segs.push(IoSeg::new(m, slot * BS, BS, true).unwrap());
        let r = IoRequest {
            tag: slot as u64,
            op: IoOp::Read,
            offset: (next(rng) % blocks) * BS as u64,
            len: 0,
            segs,
            fua: false,
        };
        e.queue(r).unwrap();
    };
    for slot in 0..QD {
        submit(&mut *e, slot, Vec::with_capacity(1), &mut rng);
    }
    e.kick().unwrap();
    let mut out: Vec<Completion> = Vec::with_capacity(QD);
    let mut ops = 0u64;
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        let mut fds = [PollFd::new(e.completion_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(1000u16)).unwrap();
        e.reap(&mut out).unwrap();
        for c in out.drain(..) {
            assert_eq!(c.result, Ok(BS as u64));
            ops += 1;
            submit(&mut *e, c.tag as usize, c.segs, &mut rng);
        }
        e.kick().unwrap();
    }
    let iops = ops as f64 / start.elapsed().as_secs_f64();
    let cpu_us = (cpu_seconds() - cpu0) * 1e6 / ops.max(1) as f64;
    println!(
        "{:<60} {:>9.0} IOPS {:>6.1} us CPU/IO",
        e.info().describe,
        iops,
        cpu_us
    );
    iops
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored --release"]
fn test_raw_engine_bench_randread_4k_qd32_reports_iops() {
    let secs = std::env::var("DOMIO_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let path = match std::env::var("DOMIO_BENCH_FILE") {
        Ok(p) => p,
        Err(_) => {
            let p = dir.path().join("bench.img");
            let f = std::fs::File::create(&p).unwrap();
            let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7) as u8).collect();
            for i in 0..256u64 {
                f.write_all_at(&chunk, i << 20).unwrap();
            }
            f.sync_all().unwrap();
            p.to_str().unwrap().to_string()
        }
    };
    let uring = bench(raw(&path, Mechanism::IoUring, 1), secs);
    let mut pool = 0.0;
    for threads in [4, 8, 16] {
        pool = bench(raw(&path, Mechanism::ThreadPool, threads), secs);
    }
    println!("io_uring / thread pool(16) = {:.2}", uring / pool);
    if let Ok(q) = std::env::var("DOMIO_BENCH_QCOW2") {
        for threads in [4, 8, 16] {
            let opts = Qcow2Options {
                queue_depth: QD as u32,
                threads,
                ..Qcow2Options::default()
            };
            print!("{threads:>2} workers: ");
            bench(Box::new(Qcow2Engine::open(&q, true, &opts).unwrap()), secs);
        }
    }
}
