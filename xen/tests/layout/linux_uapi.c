/* Sizes, offsets and ioctl numbers of the kernel's Xen device uapi (linux-libc-dev). */
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <xen/interface/xen.h>
#include <xen/evtchn.h>
#include <xen/gntdev.h>
#include <xen/privcmd.h>

#include "common.h"

int main(void)
{
    SZ(struct ioctl_evtchn_bind_virq);
    SZ(struct ioctl_evtchn_bind_interdomain);
    OFF(struct ioctl_evtchn_bind_interdomain, remote_port);
    SZ(struct ioctl_evtchn_bind_unbound_port);
    SZ(struct ioctl_evtchn_unbind);
    SZ(struct ioctl_evtchn_notify);
    SZ(struct ioctl_evtchn_restrict_domid);
    K(IOCTL_EVTCHN_BIND_VIRQ);
    K(IOCTL_EVTCHN_BIND_INTERDOMAIN);
    K(IOCTL_EVTCHN_BIND_UNBOUND_PORT);
    K(IOCTL_EVTCHN_UNBIND);
    K(IOCTL_EVTCHN_NOTIFY);
    K(IOCTL_EVTCHN_RESET);
    K(IOCTL_EVTCHN_RESTRICT_DOMID);

    SZ(struct ioctl_gntdev_grant_ref);
    OFF(struct ioctl_gntdev_grant_ref, ref);
    SZ(struct ioctl_gntdev_map_grant_ref);
    OFF(struct ioctl_gntdev_map_grant_ref, index);
    OFF(struct ioctl_gntdev_map_grant_ref, refs);
    SZ(struct ioctl_gntdev_unmap_grant_ref);
    OFF(struct ioctl_gntdev_unmap_grant_ref, count);
    SZ(struct ioctl_gntdev_get_offset_for_vaddr);
    OFF(struct ioctl_gntdev_get_offset_for_vaddr, offset);
    OFF(struct ioctl_gntdev_get_offset_for_vaddr, count);
    SZ(struct ioctl_gntdev_set_max_grants);
    SZ(struct ioctl_gntdev_unmap_notify);
    OFF(struct ioctl_gntdev_unmap_notify, action);
    OFF(struct ioctl_gntdev_unmap_notify, event_channel_port);
    SZ(struct gntdev_grant_copy_segment);
    OFF(struct gntdev_grant_copy_segment, source);
    OFF(struct gntdev_grant_copy_segment, source.foreign.ref);
    OFF(struct gntdev_grant_copy_segment, source.foreign.offset);
    OFF(struct gntdev_grant_copy_segment, source.foreign.domid);
    OFF(struct gntdev_grant_copy_segment, dest);
    OFF(struct gntdev_grant_copy_segment, len);
    OFF(struct gntdev_grant_copy_segment, flags);
    OFF(struct gntdev_grant_copy_segment, status);
    SZ(struct ioctl_gntdev_grant_copy);
    OFF(struct ioctl_gntdev_grant_copy, segments);
    K(UNMAP_NOTIFY_CLEAR_BYTE);
    K(UNMAP_NOTIFY_SEND_EVENT);
    K(IOCTL_GNTDEV_MAP_GRANT_REF);
    K(IOCTL_GNTDEV_UNMAP_GRANT_REF);
    K(IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR);
    K(IOCTL_GNTDEV_SET_MAX_GRANTS);
    K(IOCTL_GNTDEV_SET_UNMAP_NOTIFY);
    K(IOCTL_GNTDEV_GRANT_COPY);

    SZ(struct privcmd_hypercall);
    SZ(struct privcmd_mmapbatch_v2);
    OFF(struct privcmd_mmapbatch_v2, dom);
    OFF(struct privcmd_mmapbatch_v2, addr);
    OFF(struct privcmd_mmapbatch_v2, arr);
    OFF(struct privcmd_mmapbatch_v2, err);
    SZ(struct privcmd_dm_op_buf);
    OFF(struct privcmd_dm_op_buf, size);
    SZ(struct privcmd_dm_op);
    OFF(struct privcmd_dm_op, num);
    OFF(struct privcmd_dm_op, ubufs);
    SZ(struct privcmd_mmap_resource);
    OFF(struct privcmd_mmap_resource, type);
    OFF(struct privcmd_mmap_resource, id);
    OFF(struct privcmd_mmap_resource, idx);
    OFF(struct privcmd_mmap_resource, num);
    OFF(struct privcmd_mmap_resource, addr);
    K(IOCTL_PRIVCMD_HYPERCALL);
    K(IOCTL_PRIVCMD_MMAPBATCH_V2);
    K(IOCTL_PRIVCMD_DM_OP);
    K(IOCTL_PRIVCMD_RESTRICT);
    K(IOCTL_PRIVCMD_MMAP_RESOURCE);
    return 0;
}
