#!/bin/bash
# xenlab-timeout: 120
# pvguest: `xl create` boots the tiny busybox PV guest (no disk, no NIC) on real Xen; it runs
# guest/default.sh, prints DOMU-DONE and powers off. Checks the guest path that later blkback/
# netback scenarios build on, and that the guest initrd carries domio.
source /xenlab/lib.sh

pv_guest_cfg pvguest
t0=$(up)
check xl-create sh -c "xl create /root/pvguest.cfg > $XENLAB_ARTIFACTS/xl-create.log 2>&1"
log "xl create returned after $(awk "BEGIN{print $(up)-$t0}")s"
if wait_for "DOMU-DONE on the guest console" 90 guest_console_has pvguest DOMU-DONE; then pass guest-boots
else fail guest-boots "no DOMU-DONE within 90s"; fi
log "DOMU-DONE $(awk "BEGIN{print $(up)-$t0}")s after xl create"
check guest-has-domio guest_console_has pvguest "DOMU: domio present"
check guest-powers-off wait_for "domain pvguest gone" 30 domain_gone pvguest
echo "--- guest console"; cat /var/log/xen/console/guest-pvguest.log || true
finish
