#!/usr/bin/env bash
# Everything the lent GPU is for, in one call that fits its 10-minute limit. Each part runs in its own
# process under its own time limit, so one that fails or overruns costs only itself; results and logs go to
# $OUT (the device tool brings that folder back):
#   0. bench/kernel_tiles.py: the fused kernel's tile settings timed on the int4 experts (the fastest is used below),
#      int8 at that tile, and fp8 at that tile against the fp8 matrix units (the faster is used below);
#   1. bench/gpu.py on the 26B-A4B shape: diffgemma in bf16, fp8 and int4 (PLAIN_FORMATS), eager and CUDA graph
#      (steps, floor, whole loop, AR, memory, activations, prefill, syncs), a kernel profile of each graph step;
#   2. the same with the decoder's layers compiled (torch.compile; COMPILE_FORMATS, default all three);
#   3. (TRAIN_SECONDS > 0) the sudoku model trained for TRAIN_SECONDS, beside the autoregressive baseline (the same
#      network and budget: both train at once on the one GPU for the same wall-clock time), both scored by
#      bench/sudoku.py on the 1,000 puzzles of $PUZZLES (diffusion, 1 step, int8, int4, AR);
#   4. (REFERENCE="eager compiled") transformers on the same 26B-A4B weights, whatever time is left. One call
#      cannot hold every part: for the reference's compiled mode (its compile took over 132 s on an H100) give
#      it a call of its own beside our compiled bf16 rows, e.g. DIFFGEMMA_KERNEL_TILE=64,64,4,3 (no tile step)
#      PLAIN_FORMATS= (an empty list skips a part) COMPILE_FORMATS=none (bf16) REFERENCE=compiled.
# Inputs (carried, ignored by git): .whl/ (transformers 5.23 for the reference), .devdata/ (the puzzle
# pool cache and the evaluation puzzles). A dry run on the CPU at tiny sizes:
#   DEVICE=cpu SHAPE=tiny DTYPE=bfloat16 TRAIN_SECONDS=20 BATCH=8 POOL=100 REFERENCE=eager \
#   POOL_FILE=/tmp/pool.txt PUZZLES=/tmp/puzzles.txt LIMIT=900 OUT=/tmp/out bash bench/device.sh
set -u
OUT=${OUT:?set OUT to a folder for results}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-26b-a4b}
DTYPE=${DTYPE:-bfloat16}
TRAIN_SECONDS=${TRAIN_SECONDS:-0}  # the 2026-11-27 run used 150: too short to train (bench/RESULTS.md)
BATCH=${BATCH:-512}
POOL=${POOL:-40000}
PUZZLES=${PUZZLES:-.devdata/eval1000.txt}
POOL_FILE=${POOL_FILE:-.devdata/sudoku_pool.txt}
LIMIT=${LIMIT:-585}
PLAIN_LIMIT=${PLAIN_LIMIT:-240}
COMPILE_LIMIT=${COMPILE_LIMIT:-240}
REFERENCE=${REFERENCE:-}  # the 2026-11-27 run measured both modes on an H100 (bench/RESULTS.md)
ITERS=${ITERS:-20}
started=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
left() { echo $((LIMIT - ($(date +%s) - started))); }
say() { echo "=== [$(($(date +%s) - started)) s] $*"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    # .whl holds wheels for several Python versions: install those this interpreter takes
    mapfile -t wheels < <(python3 -c '
import glob
from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import parse_wheel_filename
supported = set(sys_tags())
for path in sorted(glob.glob(".whl/*.whl")):
    if parse_wheel_filename(path.rsplit("/", 1)[1])[3] & supported:
        print(path)
')
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
        && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

if [ -z "${DIFFGEMMA_KERNEL_TILE:-}" ] && [ "$DEVICE" = cuda ]; then
    say "0. bench/kernel_tiles.py: the fused kernel's tiles on the experts (int4; then int8 at the chosen tile)"
    timeout "${TILE_LIMIT:-60}" python3 bench/kernel_tiles.py --shape "$SHAPE" --device "$DEVICE" | tee "$OUT/kernel_tiles.md" \
        || say "kernel_tiles.py ended with $?"
    tile=$(sed -n 's/^fastest for 1 canvas(es): DIFFGEMMA_KERNEL_TILE=\([0-9,]*\).*/\1/p' "$OUT/kernel_tiles.md")
    [ -n "$tile" ] && export DIFFGEMMA_KERNEL_TILE=$tile && say "kernel tile for the rest of the call: $tile"
    timeout 25 python3 bench/kernel_tiles.py --shape "$SHAPE" --device "$DEVICE" --format int8 \
        --candidates "${tile:-64,64,4,3}" | tee -a "$OUT/kernel_tiles.md" || say "kernel_tiles.py (int8) ended with $?"
    # fp8 through the fused kernel against the fp8 matrix units (Hopper): the faster serves the rest of the call
    timeout 30 python3 bench/kernel_tiles.py --shape "$SHAPE" --device "$DEVICE" --format fp8 \
        --candidates "${tile:-64,64,4,3}" | tee "$OUT/kernel_tiles_fp8.md" || say "kernel_tiles.py (fp8) ended with $?"
    cat "$OUT/kernel_tiles_fp8.md" >> "$OUT/kernel_tiles.md"
    if grep -q "^fp8 for 1 canvas(es): DIFFGEMMA_FP8_MATRIX_UNITS=0" "$OUT/kernel_tiles_fp8.md"; then
        export DIFFGEMMA_FP8_MATRIX_UNITS=0 && say "fp8 through the fused kernel for the rest of the call"
    fi
fi

say "1. bench/gpu.py: diffgemma"
timeout "$PLAIN_LIMIT" python3 bench/gpu.py --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --iters "$ITERS" \
    --formats "${PLAIN_FORMATS-none,fp8,int4}" --reference "" --profile "$OUT" --results "$OUT/gpu.md" \
    || say "gpu.py (diffgemma) ended with $?"

budget=$(( $(left) - 10 )); [ "$budget" -gt "$COMPILE_LIMIT" ] && budget=$COMPILE_LIMIT
say "2. bench/gpu.py: diffgemma, compiled layers (limit ${budget} s)"
timeout "$budget" python3 bench/gpu.py --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --iters "$ITERS" \
    --formats "${COMPILE_FORMATS-none,fp8,int4}" --compile --reference "" --profile "$OUT" --results "$OUT/gpu.md" \
    || say "gpu.py (compiled) ended with $?"

if [ "$TRAIN_SECONDS" -gt 0 ]; then
say "3. sudoku: diffusion and the autoregressive baseline, ${TRAIN_SECONDS} s each, side by side"
common=(--device "$DEVICE" --seconds "$TRAIN_SECONDS" --batch-size "$BATCH" --lr 2e-3 --pool "$POOL"
    --pool-file "$POOL_FILE" --eval-every 1000 --eval-puzzles 64 --threads 4 --seed 0)
run_dir=/tmp/sudoku-runs
rm -rf "$run_dir" && mkdir -p "$run_dir"
timeout $((TRAIN_SECONDS + 60)) python3 -m diffgemma.cli train sudoku --out "$run_dir/diffusion" "${common[@]}" \
    >"$run_dir/diffusion.log" 2>&1 &
diffusion=$!
timeout $((TRAIN_SECONDS + 60)) python3 -m diffgemma.cli train sudoku --out "$run_dir/ar" --objective autoregressive \
    "${common[@]}" >"$run_dir/ar.log" 2>&1 &
baseline=$!
wait $diffusion; say "diffusion training ended with $?"
wait $baseline; say "autoregressive training ended with $?"
tail -n 4 "$run_dir/diffusion.log" "$run_dir/ar.log"

say "3b. the shipped candidate in bf16, scored on $PUZZLES"
python3 - "$run_dir" <<'EOF'
import shutil, sys, torch, diffgemma
run = sys.argv[1]
for name in ("diffusion", "ar"):
    model = diffgemma.load(f"{run}/{name}")
    model.network.to(torch.bfloat16)
    model.save(f"{run}/{name}-bf16")
    shutil.copy(f"{run}/{name}.log", f"{run}/{name}-bf16/training.log")
EOF
tar -C "$run_dir" -cf "$OUT/sudoku_model.tar" diffusion-bf16
cp "$run_dir/ar.log" "$OUT/ar_training.log"
timeout $(( $(left) > 200 ? 110 : $(left) / 2 )) python3 bench/sudoku.py --model "$run_dir/diffusion-bf16" \
    --ar "$run_dir/ar-bf16" --puzzles-file "$PUZZLES" --device "$DEVICE" --batch-size 250 \
    --results "$OUT/sudoku.md" --note "Trained on the lent GPU by bench/device.sh (logs beside)." \
    || say "sudoku.py ended with $?"
fi

for mode in $REFERENCE; do
    budget=$(( $(left) - 5 ))
    if [ "$budget" -lt 20 ]; then say "no time left for transformers ($mode)"; echo "- transformers ($mode): not run, the call's time was spent" >>"$OUT/gpu.md"; continue; fi
    [ "$mode" = eager ] && [ "$budget" -gt 100 ] && budget=100
    say "4. bench/gpu.py: transformers $mode (limit ${budget} s)"
    timeout "$budget" python3 bench/gpu.py --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --iters "$ITERS" \
        --formats "" --reference "$mode" --results "$OUT/gpu.md" \
        || { code=$?; say "transformers $mode ended with $code"; echo "- transformers ($mode): ended with exit code $code after at most ${budget} s (124: the time limit)" >>"$OUT/gpu.md"; }
done
say "done"
