#!/usr/bin/env bash
# The one prepared GPU check: on one GPU, within 10 minutes, it runs
#   tests     python -m pytest tests/test_cuda.py        (the CUDA tests, skipped without a GPU)
#   settings  python train.py --show-settings            (what train.py would choose here, and why)
#   recipe    the full recipe (52 epochs, width 64) on Fashion-MNIST written in the CIFAR-10 format
#             from its raw idx files, printing its wall time and test accuracy
#   bench     python benchmarks/bench.py --device cuda              (writing bench_cuda.json)
# in that order (the recipe before bench: its accuracy is the measurement nearest the report's 91.2 %
# that can be had without CIFAR-10), each under a time limit that keeps the whole inside the budget.
#
#   bash benchmarks/gpu_check.sh                    # every stage; results in $OUT (default: gpu_check_out/)
#   bash benchmarks/gpu_check.sh recipe bench       # only these stages (e.g. to rerun one that ran out of time)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # the same stages tiny, on the CPU: checks this script (~2 min)
#
# Under $OUT (at most 8 small files, all that comes back from a lent machine): gpu_check.log (all of
# the output), summary.json (each stage's exit status and seconds; the recipe's wall time and
# accuracy), show_settings.json, recipe.json, fashion_w64.csv (the recipe's history), test_accuracy.png
# and bench_cuda.json. The bulky intermediates (the data in the CIFAR-10 format, ~200 MB, and the
# width-64 checkpoint, ~130 MB) go to $GPU_CHECK_WORK (default: a new temporary folder).
#
# Settings (environment): FASHION_SOURCE (the folder of the four idx files; default: the first of
# ../shared/datasets/fashion-mnist, shared/datasets/fashion-mnist, /usr/share/datasets/fashion-mnist),
# GPU_CHECK_BUDGET_S (580), BENCH_ARGS (extra bench.py flags, e.g. --no-compile).
set -u -o pipefail
cd "$(dirname "$0")/.."  # the repo: every command below runs from there

DRY="${GPU_CHECK_DRY:-}"
OUT="${OUT:-gpu_check_out}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d -t gpu_check.XXXXXX)}"
BUDGET="${GPU_CHECK_BUDGET_S:-580}"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests settings recipe bench)
# Each stage's own limit in seconds, and what it leaves for each later stage it must not crowd out.
declare -A CAP=([tests]=150 [settings]=60 [recipe]=330 [bench]=240)
RESERVE=30
for s in "${STAGES[@]}"; do
    [ -n "${CAP[$s]:-}" ] || { echo "gpu_check.sh: no stage '$s'; the stages are tests settings recipe bench" >&2; exit 2; }
done
mkdir -p "$OUT" "$WORK" || exit 2
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY="${PYTHON:-python3}"  # a lent GPU machine's torch is its python3's; it may have no `python`
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TQDM_MININTERVAL=5  # fewer progress-bar redraws in the log

if [ -n "$DRY" ]; then
    DEVICE=cpu; export OMP_NUM_THREADS=1
else
    DEVICE=cuda
fi
SOURCE="${FASHION_SOURCE:-}"
if [ -z "$SOURCE" ]; then
    for dir in ../shared/datasets/fashion-mnist shared/datasets/fashion-mnist /usr/share/datasets/fashion-mnist; do
        [ -f "$dir/train-images-idx3-ubyte.gz" ] && { SOURCE=$dir; break; }
    done
fi

START=$(date +%s)
RESULTS=()   # "stage rc seconds" lines for summary.json

# run_stage NAME COMMAND...: run it under its limit (its cap, or what the budget leaves after the later
# stages' reserve), log its exit status and seconds.
run_stage() {
    local name=$1; shift
    local later=0 seen=0 s
    for s in "${STAGES[@]}"; do
        [ $seen -eq 1 ] && later=$((later + 1))
        [ "$s" = "$name" ] && seen=1
    done
    local left=$((BUDGET - ($(date +%s) - START) - later * RESERVE))
    local limit=${CAP[$name]}
    [ $left -lt $limit ] && limit=$left
    if [ $limit -le 0 ]; then
        echo "=== $name: skipped, the ${BUDGET} s budget is spent"
        RESULTS+=("$name skipped 0")
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local took=$(($(date +%s) - t0))
    [ $rc -eq 124 ] && echo "=== $name: stopped at its ${limit} s limit" || echo "=== $name: exit status $rc after ${took} s"
    RESULTS+=("$name $rc $took")
}

echo "gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), stages: ${STAGES[*]}${DRY:+ (dry run on the CPU)}"
echo "work folder: $WORK; Fashion-MNIST source: ${SOURCE:-not found}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:', torch.cuda.is_available(),
    *([torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), torch.cuda.device_count(), 'GPU(s)'] if torch.cuda.is_available() else []))"

for stage in "${STAGES[@]}"; do
    case $stage in
    tests)
        run_stage tests "$PY" -m pytest -q -rs tests/test_cuda.py ;;
    settings)
        if [ -n "$DRY" ]; then  # the CPU has no CIFAR-10 either: the synthetic data's settings
            run_stage settings bash -c "set -o pipefail; $PY train.py --show-settings --device cpu --synthetic --data-dir '$WORK/synthetic' \
                --width 4 | tee '$OUT/show_settings.json'"
        else
            run_stage settings bash -c "set -o pipefail; $PY train.py --show-settings | tee '$OUT/show_settings.json'"
        fi ;;
    recipe)
        if [ -z "$SOURCE" ]; then
            echo "=== recipe: no Fashion-MNIST idx files found; set FASHION_SOURCE to their folder"
            RESULTS+=("recipe 2 0")
            continue
        fi
        if [ -n "$DRY" ]; then
            RECIPE=(--width 4 --epochs 1 --iterations 30 --device cpu)
        else
            RECIPE=(--width 64 --epochs 52 --device cuda)
        fi
        run_stage recipe bash -c "
            $PY docs/fashion_mnist_as_cifar10.py --source '$SOURCE' --out '$WORK/fashion' || exit
            started=\$(date +%s)
            $PY train.py --data-dir '$WORK/fashion' ${RECIPE[*]} --checkpoint '$WORK/fashion_w64.pt' \
                --figures-dir '$WORK/figures' --overwrite
            rc=\$?
            echo \"train.py wall time: \$((\$(date +%s) - started)) s (exit status \$rc)\"
            exit \$rc"
        # what the run reached, also when it was stopped at its limit (train.py saves after every epoch)
        "$PY" - "$WORK/fashion_w64.pt" "$OUT/recipe.json" "${RESULTS[-1]}" <<'EOF'
import json, sys, torch
path, out, (stage, rc, seconds) = sys.argv[1], sys.argv[2], sys.argv[3].split()
try:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
except (OSError, RuntimeError) as err:
    print(f"recipe: no checkpoint to read ({err})")
    sys.exit()
h, c = ckpt["history"], ckpt["config"]
result = dict(data=c["data_name"], device=c["device"], device_name=c["device_name"], width=c["width"],
              epochs_asked=c["epochs"], epochs_done=ckpt["epoch"], iterations=ckpt["iteration"],
              complete=rc == "0", stage_seconds=int(seconds), test_acc=h["test_acc"][-1] if h["test_acc"] else None,
              best_test_acc=max(h["test_acc"], default=None), settings={k: c[k] for k in
              ("precision", "channels_last", "cuda_graph", "compile")}, speed_reason=c["speed_reason"],
              speed_probe=c["speed_probe"], torch=torch.__version__)
json.dump(result, open(out, "w"), indent=2)
print(f"recipe: {result['epochs_done']} of {result['epochs_asked']} epochs, test accuracy {result['test_acc']} "
      f"(best {result['best_test_acc']}), {seconds} s for the stage, {'complete' if result['complete'] else 'NOT complete'}")
EOF
        cp "$WORK/fashion_w64.csv" "$OUT/fashion_w64.csv" 2>/dev/null
        cp "$WORK/figures/test_accuracy.png" "$OUT/test_accuracy.png" 2>/dev/null ;;
    bench)
        if [ -n "$DRY" ]; then
            run_stage bench "$PY" benchmarks/bench.py --device cpu --quick --width 4 --images 512 --test-images 256 --workers 0 \
                ${BENCH_ARGS:-} --json "$OUT/bench_cpu_dry.json"
        else
            run_stage bench "$PY" benchmarks/bench.py --device cuda ${BENCH_ARGS:-} --json "$OUT/bench_cuda.json"
        fi ;;
    esac
done

"$PY" - "$OUT/summary.json" "$(( $(date +%s) - START ))" "${RESULTS[@]}" <<'EOF'
import json, os, sys
out, total, rows = sys.argv[1], int(sys.argv[2]), [r.split() for r in sys.argv[3:]]
recipe = os.path.join(os.path.dirname(out), "recipe.json")
summary = dict(total_s=total, stages={s: dict(exit_status=rc, seconds=int(t)) for s, rc, t in rows},
               recipe=json.load(open(recipe)) if os.path.exists(recipe) else None)
json.dump(summary, open(out, "w"), indent=2)
print(f"\ngpu_check.sh: {total} s in all")
for s, rc, t in rows:
    print(f"  {s:9} {'ok' if rc == '0' else 'FAILED (exit status ' + rc + ')' if rc != 'skipped' else 'skipped'}  {t} s")
sys.exit(0 if all(rc == "0" for _, rc, _ in rows) else 1)
EOF
