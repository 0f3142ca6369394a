//! netback: the PV network backend (io/netif.h) over a tap device.
//!
//! * [`engine`]: the network engine contract (a queue that carries frames with a
//!   `virtio_net_hdr`), shared with devmodel's virtio-net.
//! * [`tap`]: the engine on a tap device, with offloads and multiple queues, and the host side
//!   (bridge, hotplug scripts).

pub mod engine;
pub mod tap;
