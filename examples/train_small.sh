#!/usr/bin/env bash
# Train the small config through the three stages on one GPU, as the docs' runs did.
#   bash examples/train_small.sh [teacher|student|self-forcing|all] [MINUTES per stage]
# Each stage stops at a checkpoint after MINUTES (exit 3 = resumable); `export` then writes
# the weights reached so that the next stage can start. A self-forcing run's generator is
# its best snapshot by validation (`export --best`: the true sprites drawn where they are),
# in RUN/best.safetensors. Run folders: runs/small/...
set -uo pipefail
stage=${1:-all}; minutes=${2:-9}
# on a GPU the blocks are compiled (1.5-1.75x faster steps; the first step compiles, ~70 s)
compile=$(command -v nvidia-smi >/dev/null && echo --compile || true)
run() { python -m models train "$@" --config small --no-progress $compile --time-limit "$minutes"
        rc=$?; [ $rc -eq 3 ] && python -m models export "runs/small/$1" --config small
        [ $rc -eq 0 ] || [ $rc -eq 3 ]; }
best() { python -m models export "$1" --config small --best; }
case $stage in
  teacher) run teacher ;;
  student) run student ;;
  self-forcing) run self-forcing --pattern sparse-forcing --run-dir runs/small/self-forcing-sparse-forcing &&
                best runs/small/self-forcing-sparse-forcing &&
                run self-forcing --pattern dense --run-dir runs/small/self-forcing &&
                best runs/small/self-forcing ;;
  all) run teacher && run student &&
       run self-forcing --pattern sparse-forcing --run-dir runs/small/self-forcing-sparse-forcing &&
       best runs/small/self-forcing-sparse-forcing &&
       run self-forcing --pattern dense --run-dir runs/small/self-forcing &&
       best runs/small/self-forcing ;;
esac
