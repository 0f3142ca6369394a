#!/bin/bash
# xenlab-timeout: 180
# xl-pv-qcow2: as xl-pv, with the guest's qdisk a qcow2 overlay (`format=qcow2`) over a raw
# base holding dom0's marker. Adds: `qemu-img check` passes on the overlay after xl destroy,
# the base is byte-identical, the overlay (flattened with `qemu-img convert`) holds the
# marker and the guest's line and data.
XLPV_FORMAT=qcow2 XLPV_NAME=xlpvq source /xenlab/scenarios/xl-pv.sh
