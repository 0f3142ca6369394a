#!/usr/bin/env bash
# HVM benchmarks (issue 5), each next to its peer in the same run, ROUNDS rounds alternating:
#   1. the PIO round trip (`domio bench ioreq`): a xensim vCPU's `in` answered by domio's ioreq
#      server, against an eventfd ping-pong between two threads (target: ratio <= 1.5), with
#      both sides sleeping (--spin-us 0) and with the default 20 us of polling;
#   2. virtio-blk 4 KiB random reads at queue depth 32 through ioreqs (`domio bench virtio-blk`:
#      the guest OS library's driver, domio's ioreq server and devmodel, the raw engine) against
#      blkback's on the same image (`domio bench blk`), target: ratio >= 0.9.
# Usage: scripts/bench-hvm.sh [IMAGE]   (default /var/tmp/domio-bench-blk.img, 1 GiB, created
# if missing). Env: ROUNDS (3), DUR (seconds per domio bench run, 3), CPUS (empty = unpinned;
# or a taskset CPU list applied to every run alike, as in bench-blk.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-/var/tmp/domio-bench-blk.img}
ROUNDS=${ROUNDS:-3}
DUR=${DUR:-3}
PIN=()
[ -z "${CPUS:-}" ] || PIN=(taskset -c "$CPUS")
PLACE=unpinned
[ -z "${CPUS:-}" ] || PLACE="pinned with taskset -c $CPUS"
say() { printf '== %s\n' "$*" >&2; }
if [ ! -f "$IMAGE" ]; then
  say "creating $IMAGE (1 GiB of random data)"
  head -c $((1 << 30)) /dev/urandom >"$IMAGE"
fi
cargo build --release --locked -q --bin domio
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
cp target/release/domio "$OUT/domio"
json() { tail -1 | python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $ROUNDS rounds; placement: $PLACE"
for r in $(seq "$ROUNDS"); do
  "${PIN[@]}" "$OUT/domio" bench ioreq --duration "$DUR" --spin-us 0 --json 2>/dev/null |
    json "d['pio_rtt_ns'], d['pingpong_rtt_ns'], d['ratio_vs_pingpong']" >>"$OUT/ioreq0"
  "${PIN[@]}" "$OUT/domio" bench ioreq --duration "$DUR" --json 2>/dev/null |
    json "d['pio_rtt_ns'], d['pingpong_rtt_ns'], d['ratio_vs_pingpong']" >>"$OUT/ioreq20"
  v=$("${PIN[@]}" "$OUT/domio" bench virtio-blk --image "$IMAGE" --qd 32 --duration "$DUR" --json 2>/dev/null |
    json "int(d['iops'])")
  b=$("${PIN[@]}" "$OUT/domio" bench blk --engine raw --image "$IMAGE" --bs 4k --qd 32 --pattern randread \
    --duration "$DUR" --json 2>/dev/null | json "int(d['iops'])")
  echo "$v $b" >>"$OUT/vblk.txt"
  say "round $r: ioreq(spin 0) $(tail -1 "$OUT/ioreq0" | tr -d '(),'); ioreq(spin 20) $(tail -1 "$OUT/ioreq20" | tr -d '(),'); virtio-blk $v IOPS, blkback $b IOPS"
done
med() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
r0=$(tr -d '(),' <"$OUT/ioreq0" | awk '{ print $3 }' | med)
r20=$(tr -d '(),' <"$OUT/ioreq20" | awk '{ print $3 }' | med)
rv=$(awk '{ print $1 / $2 }' "$OUT/vblk.txt" | med)
printf 'PIO round trip / eventfd ping-pong, both sleeping (--spin-us 0): median %.2f (target <= 1.5)\n' "$r0"
printf 'PIO round trip / eventfd ping-pong, domio polling 20 us (default): median %.2f\n' "$r20"
printf 'virtio-blk / blkback, 4k randread QD32 IOPS: median %.2f (target >= 0.9)\n' "$rv"
say "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
