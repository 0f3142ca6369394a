#!/bin/bash
# xenlab-timeout: 60
# baseline: the lab itself works (real Xen, dom0 kernel drivers, xenstored, xenconsoled, the 9p
# share). No domio involved: when this fails, the harness is broken, not domio.
source /xenlab/lib.sh

check xl-info sh -c "xl info > $XENLAB_ARTIFACTS/xl-info.txt && grep -E '^(xen_version|xen_caps|total_memory|free_memory|nr_cpus) ' $XENLAB_ARTIFACTS/xl-info.txt"
check dom0-is-control-domain grep -q control_d /proc/xen/capabilities
for d in evtchn gntdev gntalloc privcmd xenbus xenbus_backend; do
  check "dev-xen-$d" test -c /dev/xen/$d
done
check xenstored-socket test -S /run/xenstored/socket
check xenstore-write-read sh -c 'xenstore-write /xenlab/baseline hello && [ "$(xenstore-read /xenlab/baseline)" = hello ] && xenstore-rm /xenlab/baseline'
check xenstore-dom0-name sh -c '[ "$(xenstore-read /local/domain/0/name)" = Domain-0 ]'
check xenconsoled-running sh -c 'kill -0 "$(cat /run/xen/xenconsoled.pid)"'
check 9p-share-mounted grep -q ' /mnt/share 9p ' /proc/mounts
ls -l /dev/xen > "$XENLAB_ARTIFACTS/dev-xen.txt"
finish
