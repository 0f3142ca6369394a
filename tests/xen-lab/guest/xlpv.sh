#!/bin/sh
# Guest side of the xl-pv scenario (xl spawned domio as the device model): the disk I/O of
# guest/blk.sh on xvda (a qdisk disk), then the network I/O of guest/net.sh on eth0, then the
# wait for dom0's `xl shutdown`/`xl destroy`.
BLK_THEN_RETURN=1; . /xenlab/guest/blk.sh
. /xenlab/guest/net.sh
