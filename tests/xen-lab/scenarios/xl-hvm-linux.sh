#!/bin/bash
# xenlab-timeout: 720
# xl-hvm-linux (issue 6, scenario 2): xl-hvm, and the guest's Linux boots to its init and does
# the xl-pv guest's disk and network I/O on the PV disk and NIC domio serves (see xl-hvm.sh).
XLHVM_LINUX=1 source /xenlab/scenarios/xl-hvm.sh
