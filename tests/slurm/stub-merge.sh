#!/usr/bin/env bash
# Stand-in for iteris-mpi that tests the sbatch scripts' signal / requeue plumbing without the lead's
# checkpoint code: prints "iter k/30" lines; on TERM/USR1/INT it "checkpoints" (writes STUB_DIR/checkpoint)
# and exits 5 like iteris-mpi should; with -restart 1 it checks the checkpoint exists and exits 0.
# Rank 0 only (SLURM_PROCID) writes; other ranks just wait.
dir=${STUB_DIR:?STUB_DIR unset}
rank=${SLURM_PROCID:-0}
restart=0
for a in "$@"; do [ "$prev" = -restart ] && restart=$a; prev=$a; done
echo "[stub rank $rank] args: $* (SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-unset})"
if [ "$restart" = 1 ]; then
  [ -f "$dir/checkpoint" ] || { echo "[stub rank $rank] -restart 1 but no checkpoint"; exit 2; }
  [ "$rank" = 0 ] && echo "resumed from $(cat "$dir/checkpoint")" >"$dir/resumed"
  exit 0
fi
stop=0
trap 'stop=15' TERM; trap 'stop=10' USR1; trap 'stop=2' INT
for k in $(seq 30); do
  [ "$stop" != 0 ] && { [ "$rank" = 0 ] && echo "iter $k signal $stop" >"$dir/checkpoint"; exit 5; }
  echo "[stub rank $rank] iter $k/30 layer 1/1"
  sleep 0.5 & wait $!
done
exit 0
