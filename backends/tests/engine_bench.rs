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
    open_engine, Completion, Engine, EngineOptions, IoMem, IoOp, IoRequest, IoSeg, Mechanism,
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

fn raw(path: &str, mech: Mechanism) -> Box<dyn Engine> {
    let opts = RawOptions {
        queue_depth: QD as u32,
        mechanism: mech,
        direct: true,
        pool_threads: 4,
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
    println!("{:<60} {:>9.0} IOPS", e.info().describe, iops);
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
    let uring = bench(raw(&path, Mechanism::IoUring), secs);
    let pool = bench(raw(&path, Mechanism::ThreadPool), secs);
    println!("io_uring / thread pool = {:.2}", uring / pool);
    if let Ok(q) = std::env::var("DOMIO_BENCH_QCOW2") {
        let opts = EngineOptions {
            queue_depth: QD as u32,
            threads: 4,
            ..EngineOptions::default()
        };
        let e = open_engine(&format!("qcow2:{q}"), true, &opts).unwrap();
        bench(e, secs);
    }
}
