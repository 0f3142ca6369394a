/*
 * The kernel's uapi xen/privcmd.h includes <xen/interface/xen.h>, a kernel-internal header
 * that is not installed, and evtchn.h/gntdev.h use its typedefs. This stub supplies the
 * three typedefs with the x86 Linux definitions so that the uapi headers compile in
 * userspace, as the Xen tools' copies do.
 */
#ifndef DOMIO_STUB_XEN_INTERFACE_XEN_H
#define DOMIO_STUB_XEN_INTERFACE_XEN_H
#include <stdint.h>
typedef uint16_t domid_t;
typedef unsigned long xen_pfn_t;
typedef uint32_t grant_ref_t;
#endif
