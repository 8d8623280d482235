#!/usr/bin/env bash
# Cold-cache merge on a slow disk: our merge against the I/O floor (cat of the inputs, then dd of the
# output's bytes with O_DIRECT) and mergekit, all on a loop device (direct I/O to its backing file)
# throttled for reads and writes by the blkio cgroup (v1: blkio.throttle.*_bps_device; v2: io.max,
# not tried here). Needs root. The page cache is dropped before every run.
#
#   tests/benchmarks/slow_disk.sh MODELS [BPS ...]
#
# MODELS: a folder with base/ ft1/ ft2/ ft3/ (bench_merge.py builds them under
# /tmp/hfms-bench/models/<hash>/). BPS: caps in bytes/s (default 200000000 100000000).
# Environment: REPS (default 2), IMG (backing file, default /var/tmp/hfms-slow.img, 14 GiB sparse),
# MERGEKIT_VENV (default /work/mergekit-venv; mergekit runs once per cap if it is there).
set -euo pipefail
MODELS=$(realpath "$1"); shift
if [ $# -gt 0 ]; then CAPS=("$@"); else CAPS=(200000000 100000000); fi
REPS=${REPS:-2}
IMG=${IMG:-/var/tmp/hfms-slow.img}
MNT=$(mktemp -d /tmp/hfms-slow-mnt.XXXXXX)
MERGEKIT=${MERGEKIT_VENV:-/work/mergekit-venv}/bin/mergekit-yaml

truncate -s 14G "$IMG"
LOOP=$(losetup --find --show --direct-io=on "$IMG")
cleanup() {
  umount "$MNT" 2>/dev/null || true
  losetup -d "$LOOP" 2>/dev/null || true
  rm -f "$IMG"; rmdir "$MNT" 2>/dev/null || true
  [ -n "${CG:-}" ] && rmdir "$CG" 2>/dev/null || true
}
trap cleanup EXIT
mkfs.ext4 -q -F "$LOOP"
mount "$LOOP" "$MNT"
cp -r "$MODELS"/base "$MODELS"/ft1 "$MODELS"/ft2 "$MODELS"/ft3 "$MNT"/
sync
MAJMIN=$(lsblk -no MAJ:MIN "$LOOP" | tr -d ' ')

if [ -d /sys/fs/cgroup/blkio ]; then
  CG=/sys/fs/cgroup/blkio/hfms-slow; mkdir -p "$CG"
  throttle() {
    echo "$MAJMIN $1" > "$CG/blkio.throttle.read_bps_device"
    echo "$MAJMIN $1" > "$CG/blkio.throttle.write_bps_device"
  }
else
  CG=/sys/fs/cgroup/hfms-slow; mkdir -p "$CG"
  echo "+io" > /sys/fs/cgroup/cgroup.subtree_control
  throttle() { echo "$MAJMIN rbps=$1 wbps=$1" > "$CG/io.max"; }
fi

# A command in the throttled cgroup; prints its wall time (s) and peak RSS (KB).
in_cg() { /usr/bin/time -f "%e %M" bash -c 'echo $$ > "$0/cgroup.procs"; exec "$@"' "$CG" "$@" > /dev/null 2> "$MNT/time.log" \
  || { echo "failed: $*" >&2; cat "$MNT/time.log" >&2; exit 1; }; tail -1 "$MNT/time.log"; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
inputs=("$MNT"/base/*.safetensors "$MNT"/ft?/*.safetensors)

# The output's size: one merge without a cap.
throttle 0 2>/dev/null || true
hf-model-stock merge --base "$MNT/base" --model "$MNT/ft1" --model "$MNT/ft2" --model "$MNT/ft3" --out "$MNT/out" -q --device cpu
OUT_BYTES=$(du -sb --exclude='*.json' --exclude='*.md' "$MNT/out" | cut -f1)
rm -rf "$MNT/out"
printf 'merge_method: model_stock\nbase_model: %s\nmodels:\n  - model: %s\n  - model: %s\n  - model: %s\ndtype: bfloat16\n' \
  "$MNT/base" "$MNT/ft1" "$MNT/ft2" "$MNT/ft3" > "$MNT/mergekit.yml"

echo "| cap MB/s | rep | cat inputs s | dd output s | floor s | ours s | ours peak RSS MB | ours / floor | mergekit s |"
echo "|---|---|---|---|---|---|---|---|---|"
for bps in "${CAPS[@]}"; do
  throttle "$bps"
  for rep in $(seq "$REPS"); do
    cold; read -r cat_s _ < <(in_cg cat "${inputs[@]}")
    read -r dd_s _ < <(in_cg dd if=/dev/zero of="$MNT/dd.out" bs=16M count=$((OUT_BYTES / 16777216 + 1)) oflag=direct)
    rm -f "$MNT/dd.out"
    cold; read -r ours_s ours_kb < <(in_cg hf-model-stock merge --base "$MNT/base" --model "$MNT/ft1" --model "$MNT/ft2" \
      --model "$MNT/ft3" --out "$MNT/out" -q --device cpu)
    rm -rf "$MNT/out"
    mk="-"
    if [ -x "$MERGEKIT" ] && [ "$rep" = 1 ]; then
      cold; read -r mk _ < <(in_cg "$MERGEKIT" "$MNT/mergekit.yml" "$MNT/out-mk" --no-cuda --lazy-unpickle --quiet --no-copy-tokenizer)
      rm -rf "$MNT/out-mk"
    fi
    floor=$(echo "$cat_s + $dd_s" | bc)
    echo "| $((bps / 1000000)) | $rep | $cat_s | $dd_s | $floor | $ours_s | $((ours_kb / 1000)) | $(echo "scale=2; $ours_s / $floor" | bc) | $mk |"
  done
done
