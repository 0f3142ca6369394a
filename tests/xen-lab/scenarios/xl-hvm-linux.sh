#!/bin/bash
# xenlab-timeout: 1000
# xenlab-default: no
# xl-hvm-linux (issue 6, scenario 2): xl-hvm, and the guest's Linux boots to its init and does
# the xl-pv guest's disk and network I/O on the PV disk and NIC domio serves (see xl-hvm.sh).
# Opt-in: the lab's nested TCG faults in about one HVM Linux boot in three, and after one such
# fault the whole lab VM stopped making progress (README, "HVM guests and the nested TCG").
XLHVM_LINUX=1 source /xenlab/scenarios/xl-hvm.sh
