//! netback: the PV network backend (io/netif.h) over a tap device.
//!
//! * [`tap`]: the network engine: tap devices with vnet headers, offloads and multiple
//!   queues, and the host side (bridge, hotplug scripts). virtio-net in `devmodel` uses it too.

pub mod tap;
