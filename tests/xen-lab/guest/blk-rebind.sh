#!/bin/sh
# Guest side of blk-rebind*: guest/blk.sh with an unbind/bind of xen-blkfront in the middle.
BLK_RECONNECT=rebind; . /xenlab/guest/blk.sh
