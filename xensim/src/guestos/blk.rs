//! A virtio-blk driver: feature negotiation (multi-queue, flush, discard, write-zeroes),
//! one MSI-X vector per queue, batches of requests spread over the queues, completion by
//! interrupt and the used ring.

use std::time::{Duration, Instant};

use super::pci::PciFunction;
use super::virtio::{Buf, VirtioPciDev, Virtqueue};
use super::{bus_err, GuestOsError, RamAlloc, Result};
use crate::hvm::HvmBus;

/// VIRTIO_BLK_F_SIZE_MAX.
pub const F_SIZE_MAX: u64 = 1 << 1;
/// VIRTIO_BLK_F_SEG_MAX.
pub const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_MQ.
pub const F_MQ: u64 = 1 << 12;
/// VIRTIO_BLK_F_DISCARD.
pub const F_DISCARD: u64 = 1 << 13;
/// VIRTIO_BLK_F_WRITE_ZEROES.
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get id.
pub const T_GET_ID: u32 = 8;
/// Discard.
pub const T_DISCARD: u32 = 11;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = 13;

/// One request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// VIRTIO_BLK_T_*.
    pub ty: u32,
    /// Starting sector (512 bytes).
    pub sector: u64,
    /// Data buffer in guest RAM (IN, OUT, GET_ID), or sector count in `len / 512` for
    /// DISCARD and WRITE_ZEROES (their 16-byte segment is built by the driver).
    pub gpa: u64,
    /// Data length in bytes.
    pub len: u32,
}

/// A virtio-blk device driven by the guest.
#[derive(Debug)]
pub struct VirtioBlkDriver {
    /// The transport.
    pub dev: VirtioPciDev,
    /// Queues.
    pub queues: Vec<Virtqueue>,
    /// Negotiated features.
    pub features: u64,
    /// Capacity in sectors.
    pub capacity: u64,
    /// size_max, seg_max (0 if not offered).
    pub size_max: u32,
    /// Per-descriptor scratch: header (16), segment (16) and status (1) for each possible head.
    scratch: u64,
    slot_size: u64,
    qsize: u16,
    /// Requests in flight at most, over all queues (a queue depth, as fio's iodepth).
    max_in_flight: usize,
}

impl VirtioBlkDriver {
    /// Brings the device up with up to `want_queues` queues of `qsize` entries.
    pub fn new<B: HvmBus>(
        b: &B,
        f: &PciFunction,
        ram: &RamAlloc,
        vector_base: u32,
        want_queues: u16,
        qsize: u16,
    ) -> Result<VirtioBlkDriver> {
        let dev = VirtioPciDev::new(b, f, vector_base)?;
        let features = dev.negotiate(
            b,
            F_SIZE_MAX
                | F_SEG_MAX
                | F_BLK_SIZE
                | F_FLUSH
                | F_MQ
                | F_DISCARD
                | F_WRITE_ZEROES
                | F_RO
                | super::virtio::F_EVENT_IDX,
        )?;
        let cfg = |off: u64, size: u8| b.mmio_read(dev.device + off, size).map_err(bus_err);
        let capacity = cfg(0, 8)?;
        let size_max = if features & F_SIZE_MAX != 0 {
            cfg(8, 4)? as u32
        } else {
            0
        };
        let nq = if features & F_MQ != 0 {
            (cfg(34, 2)? as u16).clamp(1, want_queues.max(1))
        } else {
            1
        };
        dev.enable_msix(b, nq + 1)?;
        dev.set_config_vector(b, 0)?;
        let mut queues = Vec::new();
        for q in 0..nq {
            let mut vq = dev.setup_queue(b, q, qsize, q + 1, ram)?;
            vq.set_event_idx(features & super::virtio::F_EVENT_IDX != 0);
            queues.push(vq);
        }
        let qs = queues.first().map_or(qsize, |q| q.size);
        let slot_size = 64u64;
        let scratch = ram.alloc(slot_size * u64::from(qs) * u64::from(nq), 4096)?;
        dev.driver_ok(b)?;
        Ok(VirtioBlkDriver {
            max_in_flight: usize::MAX,
            dev,
            queues,
            features,
            capacity,
            size_max,
            scratch,
            slot_size,
            qsize: qs,
        })
    }

    fn slot(&self, q: usize, head: u16) -> u64 {
        self.scratch + self.slot_size * (q as u64 * u64::from(self.qsize) + u64::from(head))
    }

    /// Runs `ops` with as many in flight as the queues hold; returns each op's status byte
    /// (0 = OK) in order.
    pub fn run<B: HvmBus>(&mut self, b: &B, ops: &[Op], timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut status = vec![0xffu8; ops.len()];
        // (queue, head) -> op index
        let nq = self.queues.len();
        let mut owner: Vec<Vec<Option<usize>>> = (0..nq)
            .map(|_| vec![None; usize::from(self.qsize)])
            .collect();
        let (mut next, mut done) = (0usize, 0usize);
        while done < ops.len() {
            // Submit round-robin while there is room.
            let mut added = vec![false; nq];
            let mut q = next % nq.max(1);
            let mut stalled = 0;
            while next < ops.len() && stalled < nq && next - done < self.max_in_flight {
                let op = ops[next];
                let bufs_n = if matches!(op.ty, T_FLUSH) { 2 } else { 3 };
                if self.queues[q].free() < bufs_n {
                    stalled += 1;
                    q = (q + 1) % nq;
                    continue;
                }
                stalled = 0;
                // Reserve the head slot: the head is the next descriptor popped.
                let head = self.peek_head(q);
                let slot = self.slot(q, head);
                let mut hdr = [0u8; 16];
                hdr[0..4].copy_from_slice(&op.ty.to_le_bytes());
                hdr[8..16].copy_from_slice(&op.sector.to_le_bytes());
                b.ram_write(slot, &hdr).map_err(bus_err)?;
                b.ram_write(slot + 32, &[0xff]).map_err(bus_err)?;
                let hbuf = Buf {
                    gpa: slot,
                    len: 16,
                    write: false,
                };
                let sbuf = Buf {
                    gpa: slot + 32,
                    len: 1,
                    write: true,
                };
                let bufs: Vec<Buf> = match op.ty {
                    T_FLUSH => vec![hbuf, sbuf],
                    T_DISCARD | T_WRITE_ZEROES => {
                        let mut seg = [0u8; 16];
                        seg[0..8].copy_from_slice(&op.sector.to_le_bytes());
                        seg[8..12].copy_from_slice(&(op.len / 512).to_le_bytes());
                        b.ram_write(slot + 16, &seg).map_err(bus_err)?;
                        vec![
                            hbuf,
                            Buf {
                                gpa: slot + 16,
                                len: 16,
                                write: false,
                            },
                            sbuf,
                        ]
                    }
                    ty => vec![
                        hbuf,
                        Buf {
                            gpa: op.gpa,
                            len: op.len,
                            write: ty != T_OUT,
                        },
                        sbuf,
                    ],
                };
                let h = self.queues[q]
                    .add(b, &bufs)?
                    .ok_or_else(|| GuestOsError::Device("queue full".into()))?;
                debug_assert_eq!(h, head);
                owner[q][usize::from(h)] = Some(next);
                added[q] = true;
                next += 1;
                q = (q + 1) % nq;
            }
            for (qi, a) in added.iter().enumerate() {
                if *a {
                    self.queues[qi].publish(b)?;
                }
            }
            // Reap.
            b.take_irqs();
            let mut progress = false;
            for (qi, own) in owner.iter_mut().enumerate() {
                while let Some((head, _len)) = self.queues[qi].pop_used(b)? {
                    let Some(i) = own.get_mut(usize::from(head)).and_then(|o| o.take()) else {
                        return Err(GuestOsError::Device(format!(
                            "queue {qi}: used head {head} was not in flight"
                        )));
                    };
                    let mut st = [0u8; 1];
                    b.ram_read(self.slot(qi, head) + 32, &mut st)
                        .map_err(bus_err)?;
                    status[i] = st[0];
                    done += 1;
                    progress = true;
                }
            }
            if !progress && done < ops.len() {
                let now = Instant::now();
                if now >= deadline {
                    return Err(GuestOsError::Timeout(format!(
                        "virtio-blk: {done} of {} requests done",
                        ops.len()
                    )));
                }
                b.wait_irq(deadline - now);
            }
        }
        Ok(status)
    }

    /// Keeps at most `n` requests in flight (each takes 2 or 3 descriptors, so a queue of
    /// `qsize` entries holds `qsize / 3` data requests without a limit).
    pub fn set_max_in_flight(&mut self, n: usize) {
        self.max_in_flight = n.max(1);
    }

    fn peek_head(&self, q: usize) -> u16 {
        self.queues[q].peek_free()
    }

    /// Reads `len` bytes at `sector` into guest RAM at `gpa`.
    pub fn read<B: HvmBus>(&mut self, b: &B, sector: u64, gpa: u64, len: u32) -> Result<u8> {
        Ok(self.run(
            b,
            &[Op {
                ty: T_IN,
                sector,
                gpa,
                len,
            }],
            Duration::from_secs(30),
        )?[0])
    }

    /// Writes `len` bytes from guest RAM at `gpa` to `sector`.
    pub fn write<B: HvmBus>(&mut self, b: &B, sector: u64, gpa: u64, len: u32) -> Result<u8> {
        Ok(self.run(
            b,
            &[Op {
                ty: T_OUT,
                sector,
                gpa,
                len,
            }],
            Duration::from_secs(30),
        )?[0])
    }

    /// Flushes.
    pub fn flush<B: HvmBus>(&mut self, b: &B) -> Result<u8> {
        Ok(self.run(
            b,
            &[Op {
                ty: T_FLUSH,
                sector: 0,
                gpa: 0,
                len: 0,
            }],
            Duration::from_secs(30),
        )?[0])
    }

    /// Reads the device id into guest RAM at `gpa` (20 bytes) and returns it.
    pub fn get_id<B: HvmBus>(&mut self, b: &B, gpa: u64) -> Result<(u8, [u8; 20])> {
        let st = self.run(
            b,
            &[Op {
                ty: T_GET_ID,
                sector: 0,
                gpa,
                len: 20,
            }],
            Duration::from_secs(30),
        )?[0];
        let mut id = [0u8; 20];
        b.ram_read(gpa, &mut id).map_err(bus_err)?;
        Ok((st, id))
    }
}

impl Virtqueue {
    /// The descriptor the next [`Virtqueue::add`] uses as its head.
    pub fn peek_free(&self) -> u16 {
        self.free_top().unwrap_or(0)
    }
}
