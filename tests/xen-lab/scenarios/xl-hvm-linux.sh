#!/bin/bash
# xenlab-timeout: 300
# xenlab-default: no
# xl-hvm-linux (opt-in): xl-hvm, and the guest's Linux boots to its init on hvc0 and uses the
# qdisk as xvda through blkfront. Opt-in while the first boot of a lab run can triple-fault
# during ACPI initialisation (seen once, 2026-11-23; the restarted guest booted fully).
XLHVM_LINUX=1 source /xenlab/scenarios/xl-hvm.sh
