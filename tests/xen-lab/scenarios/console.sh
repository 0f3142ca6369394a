#!/bin/bash
# xenlab-timeout: 150
# console: domio serve as the backend of a real PV console on real Xen. The guest is created
# paused by xl (which only knows console 0, the one xenconsoled serves); the scenario then
# writes the nodes of a second console, device/console/1, by hand (backend
# /local/domain/0/backend/console/<domid>/1, as libxl would for a console served by a device
# model: frontend `type = ioemu`, read-only to the guest), starts
# `domio serve --domid <domid> --xen linux`, and unpauses the guest. Linux's hvc_xen frontend
# connects; guest/console.sh writes three lines to /dev/hvc1. Checks: both ends reach
# Connected (4), domio logs the guest's lines, and after `xl destroy` domio notices and exits 0.
source /xenlab/lib.sh
XENLAB_GUEST=console pv_guest_cfg pvcons
check xl-create-paused sh -c "xl create -p /root/pvcons.cfg > $XENLAB_ARTIFACTS/xl-create.log 2>&1"
D=$(xl domid pvcons)
FE=/local/domain/$D/device/console/1
BE=/local/domain/0/backend/console/$D/1
check write-console-1-nodes sh -c "
  xenstore-write $BE/frontend $FE $BE/frontend-id $D $BE/online 1 $BE/protocol vt100 $BE/state 1 &&
  xenstore-write $FE/backend $BE $FE/backend-id 0 $FE/state 1 $FE/limit 1048576 $FE/type ioemu &&
  xenstore-chmod -r $BE n0 r$D && xenstore-chmod -r $FE n$D r0 &&
  xenstore-chmod $FE/type n0 r$D && xenstore-chmod $FE/limit n0 r$D"

log "running: $DOMIO serve --domid $D --xen linux"
"$DOMIO" serve --domid "$D" --xen linux > "$XENLAB_ARTIFACTS/serve.txt" 2>&1 &
pid=$!
check unpause xl unpause pvcons
be_connected() { [ "$(xenstore-read "$BE/state" 2>/dev/null)" = 4 ]; }
fe_connected() { [ "$(xenstore-read "$FE/state" 2>/dev/null)" = 4 ]; }
lines_seen() { [ "$(grep -c 'domio-console-line-[123] from domU' "$XENLAB_ARTIFACTS/serve.txt")" -ge 3 ]; }
check backend-connected wait_for "backend state 4" 60 be_connected
check frontend-connected wait_for "frontend state 4" 30 fe_connected
check guest-lines-reach-domio wait_for "the 3 guest lines in domio's log" 30 lines_seen
if proc_exited "$pid"; then fail domio-still-running "domio serve exited while the guest ran"; else pass domio-still-running; fi
{ xenstore-ls -fp "/local/domain/0/backend/console/$D"; xenstore-ls -fp "/local/domain/$D/device"; } > "$XENLAB_ARTIFACTS/xenstore.txt" 2>&1 || true
check xl-destroy xl destroy pvcons
if wait_for "domio to exit after the domain is destroyed" 15 proc_exited "$pid" > /dev/null; then
  rc=0; wait "$pid" || rc=$?
  if [ $rc = 0 ]; then pass domio-exits-when-domain-gone; else fail domio-exits-when-domain-gone "exit status $rc"; fi
else
  fail domio-exits-when-domain-gone "still running 15 s after xl destroy"; kill -KILL "$pid" 2>/dev/null || true
fi
echo "--- domio serve log"; sed 's/^/    | /' "$XENLAB_ARTIFACTS/serve.txt"
echo "--- guest console (hvc0)"; cat /var/log/xen/console/guest-pvcons.log || true
echo "--- xenstore (before destroy)"; cat "$XENLAB_ARTIFACTS/xenstore.txt"
finish
