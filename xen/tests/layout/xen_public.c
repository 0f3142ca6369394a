/*
 * Sizes, offsets and constants of Xen's public headers (Debian libxen-dev), for
 * xen/tests/layout.rs. Built natively (compiled and run) and with -m32 -DLAYOUT_ASM (compiled
 * to assembly only), where the blkif structs take the layout of a 32-bit frontend: the
 * x86_32-abi that blkback must also speak.
 */
#include <stddef.h>
#include <stdint.h>
#ifndef LAYOUT_ASM
#include <string.h>
#endif
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#include <xen/memory.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/xs_wire.h>
#include <xen/hvm/ioreq.h>
#include <xen/hvm/hvm_op.h>
#include <xen/hvm/dm_op.h>

#include "common.h"

#define RING_SIZES(name)                                               \
    do {                                                               \
        EMIT("ring " #name " 1", __CONST_RING_SIZE(name, 4096 * 1));   \
        EMIT("ring " #name " 2", __CONST_RING_SIZE(name, 4096 * 2));   \
        EMIT("ring " #name " 3", __CONST_RING_SIZE(name, 4096 * 3));   \
        EMIT("ring " #name " 4", __CONST_RING_SIZE(name, 4096 * 4));   \
        EMIT("ring " #name " 5", __CONST_RING_SIZE(name, 4096 * 5));   \
        EMIT("ring " #name " 6", __CONST_RING_SIZE(name, 4096 * 6));   \
        EMIT("ring " #name " 7", __CONST_RING_SIZE(name, 4096 * 7));   \
        EMIT("ring " #name " 8", __CONST_RING_SIZE(name, 4096 * 8));   \
        EMIT("ring " #name " 9", __CONST_RING_SIZE(name, 4096 * 9));   \
        EMIT("ring " #name " 10", __CONST_RING_SIZE(name, 4096 * 10)); \
        EMIT("ring " #name " 11", __CONST_RING_SIZE(name, 4096 * 11)); \
        EMIT("ring " #name " 12", __CONST_RING_SIZE(name, 4096 * 12)); \
        EMIT("ring " #name " 13", __CONST_RING_SIZE(name, 4096 * 13)); \
        EMIT("ring " #name " 14", __CONST_RING_SIZE(name, 4096 * 14)); \
        EMIT("ring " #name " 15", __CONST_RING_SIZE(name, 4096 * 15)); \
        EMIT("ring " #name " 16", __CONST_RING_SIZE(name, 4096 * 16)); \
    } while (0)

/* The blkif layout; under -m32 it is the x86_32-abi. */
static void blkif(void)
{
    SZ(struct blkif_request_segment);
    OFF(struct blkif_request_segment, first_sect);
    OFF(struct blkif_request_segment, last_sect);
    SZ(struct blkif_request);
    OFF(struct blkif_request, nr_segments);
    OFF(struct blkif_request, handle);
    OFF(struct blkif_request, id);
    OFF(struct blkif_request, sector_number);
    OFF(struct blkif_request, seg);
    SZ(struct blkif_request_discard);
    OFF(struct blkif_request_discard, flag);
    OFF(struct blkif_request_discard, handle);
    OFF(struct blkif_request_discard, id);
    OFF(struct blkif_request_discard, sector_number);
    OFF(struct blkif_request_discard, nr_sectors);
    SZ(struct blkif_request_indirect);
    OFF(struct blkif_request_indirect, indirect_op);
    OFF(struct blkif_request_indirect, nr_segments);
    OFF(struct blkif_request_indirect, id);
    OFF(struct blkif_request_indirect, sector_number);
    OFF(struct blkif_request_indirect, handle);
    OFF(struct blkif_request_indirect, indirect_grefs);
    SZ(struct blkif_response);
    OFF(struct blkif_response, operation);
    OFF(struct blkif_response, status);
    SZ(union blkif_sring_entry);
    RING_SIZES(blkif);
}

#ifdef LAYOUT_ASM
void layout_abi(void)
{
    blkif();
}
#else
int main(void)
{
    blkif();
    K(BLKIF_OP_READ);
    K(BLKIF_OP_WRITE);
    K(BLKIF_OP_WRITE_BARRIER);
    K(BLKIF_OP_FLUSH_DISKCACHE);
    K(BLKIF_OP_RESERVED_1);
    K(BLKIF_OP_DISCARD);
    K(BLKIF_OP_INDIRECT);
    K(BLKIF_MAX_SEGMENTS_PER_REQUEST);
    K(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    K(BLKIF_DISCARD_SECURE);
    K(BLKIF_RSP_EOPNOTSUPP);
    K(BLKIF_RSP_ERROR);
    K(BLKIF_RSP_OKAY);
    K(VDISK_CDROM);
    K(VDISK_REMOVABLE);
    K(VDISK_READONLY);

    /* grant_table.h */
    SZ(grant_entry_v1_t);
    OFF(grant_entry_v1_t, flags);
    OFF(grant_entry_v1_t, domid);
    OFF(grant_entry_v1_t, frame);
    K(GTF_invalid);
    K(GTF_permit_access);
    K(GTF_accept_transfer);
    K(GTF_transitive);
    K(GTF_type_mask);
    K(GTF_readonly);
    K(GTF_reading);
    K(GTF_writing);
    K(GTF_PWT);
    K(GTF_PCD);
    K(GTF_PAT);
    K(GTF_sub_page);
    K(GNTST_okay);
    K(GNTST_general_error);
    K(GNTST_bad_domain);
    K(GNTST_bad_gntref);
    K(GNTST_bad_handle);
    K(GNTST_bad_virt_addr);
    K(GNTST_bad_dev_addr);
    K(GNTST_no_device_space);
    K(GNTST_permission_denied);
    K(GNTST_bad_page);
    K(GNTST_bad_copy_arg);
    K(GNTST_address_too_big);
    K(GNTST_eagain);
    K(GNTST_no_space);
    K(GNTCOPY_source_gref);
    K(GNTCOPY_dest_gref);

    /* event_channel.h */
    SZ(struct evtchn_alloc_unbound);
    OFF(struct evtchn_alloc_unbound, remote_dom);
    OFF(struct evtchn_alloc_unbound, port);
    SZ(struct evtchn_bind_interdomain);
    OFF(struct evtchn_bind_interdomain, remote_port);
    OFF(struct evtchn_bind_interdomain, local_port);
    SZ(struct evtchn_send);
    SZ(struct evtchn_close);
    K(EVTCHNOP_bind_interdomain);
    K(EVTCHNOP_bind_virq);
    K(EVTCHNOP_bind_pirq);
    K(EVTCHNOP_close);
    K(EVTCHNOP_send);
    K(EVTCHNOP_status);
    K(EVTCHNOP_alloc_unbound);
    K(EVTCHNOP_bind_ipi);
    K(EVTCHNOP_bind_vcpu);
    K(EVTCHNOP_unmask);
    K(EVTCHNOP_reset);
    K(DOMID_FIRST_RESERVED);
    K(DOMID_SELF);

    /* io/ring.h, through blkif's instance */
    OFF(struct blkif_sring, req_prod);
    OFF(struct blkif_sring, req_event);
    OFF(struct blkif_sring, rsp_prod);
    OFF(struct blkif_sring, rsp_event);
    OFF(struct blkif_sring, pvt);
    OFF(struct blkif_sring, __pad);
    OFF(struct blkif_sring, ring);

    /* io/netif.h */
    K(XEN_NETIF_NR_SLOTS_MIN);
    K(XEN_NETIF_MAX_TX_SIZE);
    K(NETTXF_csum_blank);
    K(NETTXF_data_validated);
    K(NETTXF_more_data);
    K(NETTXF_extra_info);
    K(NETRXF_data_validated);
    K(NETRXF_csum_blank);
    K(NETRXF_more_data);
    K(NETRXF_extra_info);
    K(NETRXF_gso_prefix);
    K(XEN_NETIF_EXTRA_TYPE_NONE);
    K(XEN_NETIF_EXTRA_TYPE_GSO);
    K(XEN_NETIF_EXTRA_TYPE_MCAST_ADD);
    K(XEN_NETIF_EXTRA_TYPE_MCAST_DEL);
    K(XEN_NETIF_EXTRA_TYPE_HASH);
    K(XEN_NETIF_EXTRA_TYPE_MAX);
    K(XEN_NETIF_EXTRA_FLAG_MORE);
    K(XEN_NETIF_GSO_TYPE_NONE);
    K(XEN_NETIF_GSO_TYPE_TCPV4);
    K(XEN_NETIF_GSO_TYPE_TCPV6);
    K(NETIF_RSP_DROPPED);
    K(NETIF_RSP_ERROR);
    K(NETIF_RSP_OKAY);
    K(NETIF_RSP_NULL);
    K(XEN_NETIF_CTRL_HASH_TYPE_IPV4);
    K(XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP);
    K(XEN_NETIF_CTRL_HASH_TYPE_IPV6);
    K(XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP);
    K(XEN_NETIF_CTRL_HASH_ALGORITHM_NONE);
    K(XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ);
    K(XEN_NETIF_CTRL_TYPE_INVALID);
    K(XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS);
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS);
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_KEY);
    K(XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE);
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE);
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING);
    K(XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM);
    K(XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE);
    K(XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING);
    K(XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING);
    K(XEN_NETIF_CTRL_STATUS_SUCCESS);
    K(XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED);
    K(XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER);
    K(XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW);
    K(XEN_NETIF_CTRLF_GREF_readonly);
    SZ(struct netif_tx_request);
    OFF(struct netif_tx_request, offset);
    OFF(struct netif_tx_request, flags);
    OFF(struct netif_tx_request, id);
    OFF(struct netif_tx_request, size);
    SZ(struct netif_tx_response);
    OFF(struct netif_tx_response, status);
    SZ(struct netif_rx_request);
    OFF(struct netif_rx_request, gref);
    SZ(struct netif_rx_response);
    OFF(struct netif_rx_response, offset);
    OFF(struct netif_rx_response, flags);
    OFF(struct netif_rx_response, status);
    SZ(struct netif_extra_info);
    OFF(struct netif_extra_info, flags);
    OFF(struct netif_extra_info, u);
    OFF(struct netif_extra_info, u.gso.size);
    OFF(struct netif_extra_info, u.gso.type);
    OFF(struct netif_extra_info, u.gso.pad);
    OFF(struct netif_extra_info, u.gso.features);
    OFF(struct netif_extra_info, u.mcast.addr);
    OFF(struct netif_extra_info, u.hash.type);
    OFF(struct netif_extra_info, u.hash.algorithm);
    OFF(struct netif_extra_info, u.hash.value);
    SZ(struct xen_netif_ctrl_request);
    OFF(struct xen_netif_ctrl_request, type);
    OFF(struct xen_netif_ctrl_request, data);
    SZ(struct xen_netif_ctrl_response);
    OFF(struct xen_netif_ctrl_response, type);
    OFF(struct xen_netif_ctrl_response, status);
    OFF(struct xen_netif_ctrl_response, data);
    SZ(struct xen_netif_gref);
    OFF(struct xen_netif_gref, flags);
    OFF(struct xen_netif_gref, status);
    SZ(union netif_tx_sring_entry);
    SZ(union netif_rx_sring_entry);
    SZ(union xen_netif_ctrl_sring_entry);
    RING_SIZES(netif_tx);
    RING_SIZES(netif_rx);
    RING_SIZES(xen_netif_ctrl);

    /* hvm/ioreq.h */
    K(IOREQ_READ);
    K(IOREQ_WRITE);
    K(STATE_IOREQ_NONE);
    K(STATE_IOREQ_READY);
    K(STATE_IOREQ_INPROCESS);
    K(STATE_IORESP_READY);
    K(IOREQ_TYPE_PIO);
    K(IOREQ_TYPE_COPY);
    K(IOREQ_TYPE_PCI_CONFIG);
    K(IOREQ_TYPE_TIMEOFFSET);
    K(IOREQ_TYPE_INVALIDATE);
    K(IOREQ_BUFFER_SLOT_NUM);
    SZ(ioreq_t);
    OFF(ioreq_t, data);
    OFF(ioreq_t, count);
    OFF(ioreq_t, size);
    OFF(ioreq_t, vp_eport);
    OFF(ioreq_t, _pad0);
    OFF(ioreq_t, type);
    SZ(shared_iopage_t);
    SZ(buf_ioreq_t);
    OFF(buf_ioreq_t, data);
    SZ(buffered_iopage_t);
    OFF(buffered_iopage_t, read_pointer);
    OFF(buffered_iopage_t, write_pointer);
    OFF(buffered_iopage_t, buf_ioreq);
    {
        /* The bitfield byte of ioreq_t: state=0xa, data_is_ptr=1, dir=0, df=1. */
        ioreq_t r;
        unsigned char bytes[sizeof(ioreq_t)];
        memset(&r, 0, sizeof(r));
        r.state = 0xa;
        r.data_is_ptr = 1;
        r.dir = 0;
        r.df = 1;
        memcpy(bytes, &r, sizeof(r));
        EMIT("ioreq bits state=a ptr=1 dir=0 df=1", bytes[30]);
        memset(&r, 0, sizeof(r));
        r.dir = 1;
        memcpy(bytes, &r, sizeof(r));
        EMIT("ioreq bits dir=1", bytes[30]);
    }
    {
        /* The packed first word of buf_ioreq_t. */
        buf_ioreq_t b;
        uint32_t word;
        memset(&b, 0, sizeof(b));
        b.type = 0xab;
        b.pad = 1;
        b.dir = 0;
        b.size = 2;
        b.addr = 0x12345;
        memcpy(&word, &b, sizeof(word));
        EMIT("buf_ioreq word type=ab pad=1 dir=0 size=2 addr=12345", word);
        memset(&b, 0, sizeof(b));
        b.dir = 1;
        b.size = 3;
        b.addr = 0xfffff;
        memcpy(&word, &b, sizeof(word));
        EMIT("buf_ioreq word dir=1 size=3 addr=fffff", word);
    }
    K(HVM_IOREQSRV_BUFIOREQ_OFF);
    K(HVM_IOREQSRV_BUFIOREQ_LEGACY);
    K(HVM_IOREQSRV_BUFIOREQ_ATOMIC);
    K(XENMEM_resource_ioreq_server);
    K(XENMEM_resource_grant_table);
    K(XENMEM_resource_ioreq_server_frame_bufioreq);
    K(XENMEM_resource_ioreq_server_frame_ioreq(0));
    K(XENMEM_resource_ioreq_server_frame_ioreq(3));

    /* hvm/dm_op.h */
    K(XEN_DMOP_create_ioreq_server);
    K(XEN_DMOP_get_ioreq_server_info);
    K(XEN_DMOP_map_io_range_to_ioreq_server);
    K(XEN_DMOP_unmap_io_range_from_ioreq_server);
    K(XEN_DMOP_set_ioreq_server_state);
    K(XEN_DMOP_destroy_ioreq_server);
    K(XEN_DMOP_track_dirty_vram);
    K(XEN_DMOP_set_pci_intx_level);
    K(XEN_DMOP_set_isa_irq_level);
    K(XEN_DMOP_set_pci_link_route);
    K(XEN_DMOP_modified_memory);
    K(XEN_DMOP_set_mem_type);
    K(XEN_DMOP_inject_event);
    K(XEN_DMOP_inject_msi);
    K(XEN_DMOP_map_mem_type_to_ioreq_server);
    K(XEN_DMOP_remote_shutdown);
    K(XEN_DMOP_relocate_memory);
    K(XEN_DMOP_pin_memory_cacheattr);
    K(XEN_DMOP_set_irq_level);
    K(XEN_DMOP_nr_vcpus);
    K(XEN_DMOP_no_gfns);
    K(XEN_DMOP_IO_RANGE_PORT);
    K(XEN_DMOP_IO_RANGE_MEMORY);
    K(XEN_DMOP_IO_RANGE_PCI);
    K(XEN_DMOP_PCI_SBDF(1, 2, 0x1f, 7));
    /* The macro computes in int: a segment >= 0x8000 sign-extends when widened to the u64
     * range fields. Xen matches PCI ranges on the 32-bit SBDF zero-extended (addr >> 32 of a
     * PCI_CONFIG ioreq), so domio zero-extends: compare the 32-bit value. */
    EMIT("(uint32_t)XEN_DMOP_PCI_SBDF(0xffff, 0xff, 0xff, 0xff)",
         (uint32_t)XEN_DMOP_PCI_SBDF(0xffff, 0xff, 0xff, 0xff));
    SZ(struct xen_dm_op_create_ioreq_server);
    OFF(struct xen_dm_op_create_ioreq_server, pad);
    OFF(struct xen_dm_op_create_ioreq_server, id);
    SZ(struct xen_dm_op_get_ioreq_server_info);
    OFF(struct xen_dm_op_get_ioreq_server_info, flags);
    OFF(struct xen_dm_op_get_ioreq_server_info, bufioreq_port);
    OFF(struct xen_dm_op_get_ioreq_server_info, ioreq_gfn);
    OFF(struct xen_dm_op_get_ioreq_server_info, bufioreq_gfn);
    SZ(struct xen_dm_op_ioreq_server_range);
    OFF(struct xen_dm_op_ioreq_server_range, pad);
    OFF(struct xen_dm_op_ioreq_server_range, type);
    OFF(struct xen_dm_op_ioreq_server_range, start);
    OFF(struct xen_dm_op_ioreq_server_range, end);
    SZ(struct xen_dm_op_set_ioreq_server_state);
    OFF(struct xen_dm_op_set_ioreq_server_state, enabled);
    SZ(struct xen_dm_op_destroy_ioreq_server);
    SZ(struct xen_dm_op_set_pci_intx_level);
    OFF(struct xen_dm_op_set_pci_intx_level, bus);
    OFF(struct xen_dm_op_set_pci_intx_level, device);
    OFF(struct xen_dm_op_set_pci_intx_level, intx);
    OFF(struct xen_dm_op_set_pci_intx_level, level);
    SZ(struct xen_dm_op_set_isa_irq_level);
    OFF(struct xen_dm_op_set_isa_irq_level, level);
    SZ(struct xen_dm_op_remote_shutdown);
    SZ(struct xen_dm_op_inject_msi);
    OFF(struct xen_dm_op_inject_msi, pad);
    OFF(struct xen_dm_op_inject_msi, addr);
    SZ(struct xen_dm_op);
    OFF(struct xen_dm_op, pad);
    OFF(struct xen_dm_op, u);
    EMIT("sizeof xen_dm_op.u", sizeof(((struct xen_dm_op *)0)->u));

    /* io/xs_wire.h */
    SZ(struct xsd_sockmsg);
    OFF(struct xsd_sockmsg, req_id);
    OFF(struct xsd_sockmsg, tx_id);
    OFF(struct xsd_sockmsg, len);
    SZ(struct xenstore_domain_interface);
    OFF(struct xenstore_domain_interface, rsp);
    OFF(struct xenstore_domain_interface, req_cons);
    OFF(struct xenstore_domain_interface, req_prod);
    OFF(struct xenstore_domain_interface, rsp_cons);
    OFF(struct xenstore_domain_interface, rsp_prod);
    OFF(struct xenstore_domain_interface, server_features);
    OFF(struct xenstore_domain_interface, connection);
    OFF(struct xenstore_domain_interface, error);
    K(XENSTORE_PAYLOAD_MAX);
    K(XENSTORE_ABS_PATH_MAX);
    K(XENSTORE_REL_PATH_MAX);
    K(XENSTORE_RING_SIZE);
    K(XS_CONTROL);
    K(XS_DIRECTORY);
    K(XS_READ);
    K(XS_WATCH);
    K(XS_TRANSACTION_START);
    K(XS_TRANSACTION_END);
    K(XS_INTRODUCE);
    K(XS_WRITE);
    K(XS_RM);
    K(XS_WATCH_EVENT);
    K(XS_ERROR);
    K(XS_RESET_WATCHES);
    K(XS_DIRECTORY_PART);
    K(XS_TYPE_COUNT);
    K(XS_INVALID);
    return 0;
}
#endif
