//! HVM devices on a PCI bus: host bridge, Xen platform device, UART, virtio-pci.
//! (Filled in by the ioreq/devmodel issue.)
#![deny(unsafe_code)]
