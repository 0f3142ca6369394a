#!/bin/bash
# xenlab-timeout: 180
# xenlab-default: no
# net-mq: as net-bridge with a 2-vCPU guest: xen-netfront asks for two queues
# (multi-queue-num-queues = 2, checked), domio's netback serves both on a multi-queue tap
# (IFF_MULTI_QUEUE, one descriptor per queue, checked in sysfs), same traffic checks.
NET_VCPUS=2 NET_NAME=netmq source /xenlab/scenarios/net-bridge.sh
