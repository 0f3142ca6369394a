//! netback's host side on a real tap: the [`VifHost`] that [`tap_engine_factory`] opens for
//! each vif at probe.
//!
//! At probe the tap `vif<domid>.<devid>` is created multi-queue with one anchor descriptor,
//! given Xen's host-side MAC (`fe:ff:ff:ff:ff:ff`) and the `mtu` key, brought up, and the host
//! side comes online (hotplug script or bridge), so the toolstack sees a ready interface
//! before the frontend connects. The anchor queue is then detached: it keeps the device alive
//! across frontend reconnects but no frame is steered to it. Each connect opens one queue
//! per guest queue with the offloads the frontend negotiated. Dropping the host side runs the
//! offline step, then closes the anchor, which removes the tap.

use std::io;
use std::sync::Arc;

use super::hotplug::{HostSetup, HostSide, XenbusDevice};
use super::{Offloads as TapOffloads, Tap, TapError, TapOptions, TapQueue, VifId, MAX_QUEUES};
use crate::net::engine::NetQueueIo;
use crate::net::{NetEngineFactory, Offloads, VifHost, VifParams};

/// A vif's tap and host side.
#[derive(Debug)]
pub struct TapVifHost {
    // Field order is drop order: offline first, then the tap.
    host: HostSide,
    tap: Tap,
}

fn io(e: TapError) -> io::Error {
    io::Error::other(e)
}

impl TapVifHost {
    /// Creates the tap for `p` and brings its host side online.
    pub fn open(p: &VifParams) -> io::Result<TapVifHost> {
        TapVifHost::open_with(p, false)
    }

    /// Like [`TapVifHost::open`]; with `toolstack_hotplug` the tap is only created: the
    /// toolstack runs the hotplug script itself (libxl does for a device model's vifs once
    /// the backend reaches InitWait), so neither the `script` nor the `bridge` key is acted on.
    pub fn open_with(p: &VifParams, toolstack_hotplug: bool) -> io::Result<TapVifHost> {
        let domid = xen::DomId::try_from(p.domid).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("vif {}: domid {} is out of range", p.devid, p.domid),
            )
        })?;
        let vif = VifId {
            domid,
            devid: p.devid,
        };
        let tap = Tap::open(
            vif,
            &TapOptions {
                name: Some(p.tap_name()),
                queues: 1,
                mtu: Some(p.mtu),
                multi_queue: true,
                ..TapOptions::default()
            },
        )
        .map_err(io)?;
        for q in tap.queues() {
            q.set_attached(false).map_err(|source| {
                io(TapError::Io {
                    vif,
                    name: tap.name().to_string(),
                    op: "TUNSETQUEUE detach",
                    source,
                })
            })?;
        }
        let keys = if toolstack_hotplug {
            HostSetup::None
        } else {
            HostSetup::from_keys(p.script.as_deref(), p.bridge.as_deref())
        };
        let setup = match keys {
            HostSetup::Script { script, bridge, .. } => HostSetup::Script {
                script,
                bridge,
                gatewaydev: None,
            },
            other => other,
        };
        let xenbus = XenbusDevice::at(&p.backend_type, &p.backend_path);
        let host =
            HostSide::online_for(vif, tap.name(), setup, xenbus).map_err(io::Error::other)?;
        Ok(TapVifHost { host, tap })
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }
}

impl VifHost for TapVifHost {
    fn open_queues(&mut self, n: u32, o: Offloads) -> io::Result<Vec<Box<dyn NetQueueIo>>> {
        let n = u16::try_from(n)
            .ok()
            .filter(|n| (1..MAX_QUEUES).contains(n))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: {n} queues asked for", self.tap.vif()),
                )
            })?;
        self.tap
            .set_offloads(TapOffloads {
                csum: o.csum,
                tso4: o.tso4,
                tso6: o.tso6,
                tso_ecn: false,
            })
            .map_err(io)?;
        let qs = self.tap.add_queues(n).map_err(io)?;
        Ok(qs
            .into_iter()
            .map(|q| Box::new(SharedQueue(q)) as Box<dyn NetQueueIo>)
            .collect())
    }

    fn describe(&self) -> String {
        format!("tap {} ({:?})", self.tap.name(), self.host.setup())
    }
}

/// A tap queue handed to netback.
struct SharedQueue(Arc<TapQueue>);

impl NetQueueIo for SharedQueue {
    fn send(
        &self,
        hdr: &crate::net::engine::VirtioNetHdr,
        frame: &[io::IoSlice<'_>],
    ) -> io::Result<()> {
        self.0.send(hdr, frame)
    }
    fn recv(
        &self,
        buf: &mut [u8],
    ) -> io::Result<Option<(crate::net::engine::VirtioNetHdr, usize)>> {
        self.0.recv(buf)
    }
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.fd()
    }
}

/// The engine factory for [`crate::net::NetDriver`]: a real tap per vif, with its host side.
pub fn tap_engine_factory() -> NetEngineFactory {
    Arc::new(|p: &VifParams| Ok(Box::new(TapVifHost::open(p)?) as Box<dyn VifHost>))
}

/// Taps whose hotplug script the toolstack runs (see [`TapVifHost::open_with`]).
pub fn tap_engine_factory_toolstack_hotplug() -> NetEngineFactory {
    Arc::new(|p: &VifParams| Ok(Box::new(TapVifHost::open_with(p, true)?) as Box<dyn VifHost>))
}
