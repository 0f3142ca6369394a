#!/bin/sh
# Guest side of blk-reconnect: guest/blk.sh; dom0 detaches and re-attaches the disk in the middle.
BLK_RECONNECT=detach; . /xenlab/guest/blk.sh
