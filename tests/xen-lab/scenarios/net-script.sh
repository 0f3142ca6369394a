#!/bin/bash
# xenlab-timeout: 180
# net-script: as net-bridge, but the backend carries libxl's `script` key
# (/etc/xen/scripts/vif-bridge, the absolute path libxl writes) and domio runs Xen's own
# vif-bridge with libxl's argv and environment (`online type_if=vif`, XENBUS_PATH, vif, ...):
# the script puts the tap on xenbr0 and writes hotplug-status=connected itself; `offline` runs
# when the guest goes. Same traffic checks as net-bridge.
NET_SCRIPT=/etc/xen/scripts/vif-bridge NET_NAME=netscr source /xenlab/scenarios/net-bridge.sh
