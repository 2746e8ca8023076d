#!/usr/bin/env bash
# ProtoKNN inside CaBRNet, end to end, for every option combination the shipped configs
# advertise, in a venv of its own (CaBRNet pins scikit-learn 1.5 and pillow < 11 and weighs
# about 1.4 GB, so it never enters the main .venv).
#
#   bash tests/cabrnet_ci.sh
#
# 1. creates the venv if missing or broken: torch and torchvision, then the extra
#    (pip install -e '.[cabrnet,test]'), at the versions of constraints.txt less the two
#    lines CaBRNet cannot take (marked `not-cabrnet`); about 200 s and 1.4 GB on top of torch;
# 2. points its editable install at this tree if it points elsewhere (a CI clone) or lacks
#    this tree's entry points (the run backend `cabrnet`);
# 3. writes the tiny animals image folder (60 train, 30 val, 30 test) once;
# 4. the option matrix: task loss {margin, triplet-margin, proxy-anchor} x aux loss
#    {margin, proxy-anchor, none}, the cluster variants spread over those 9 runs so each
#    appears at least once. Per combination: `cabrnet train` for one epoch on the CPU
#    (class-balanced batches, kNN validation accuracy, --save-best val_set/accuracy max),
#    then `cabrnet evaluate` on the saved `final` checkpoint, whose kNN accuracy must equal
#    the one at the end of training (the memory bank travels in the checkpoint). One line
#    per combination; the script fails if any combination failed;
# 5. pytest tests/test_cabrnet_adapter.py inside that venv (no test may skip there), which also
#    runs CaBRNet's own ProtoPNet and ProtoTree as benchmark rows, among them a tiny
#    `protoknn benchmark --heads prototree,cabrnet:prototree` under the protocol.
#
# Environment: PROTOKNN_CABRNET_VENV (default <repo>/.venv-cabrnet),
# PROTOKNN_CABRNET_WORK (default: a fresh temporary folder, removed at exit),
# PROTOKNN_CABRNET_JOBS (combinations run at once, default 2: one per core, one thread each).
set -euo pipefail

started=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PROTOKNN_CABRNET_VENV:-$ROOT/.venv-cabrnet}"
PY="$VENV/bin/python"
JOBS="${PROTOKNN_CABRNET_JOBS:-2}"
if [ -n "${PROTOKNN_CABRNET_WORK:-}" ]; then
    WORK="$PROTOKNN_CABRNET_WORK"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
step() { echo "== cabrnet_ci: $* ($(( $(date +%s) - started )) s)"; }

# task-loss aux-loss cluster-variant: the full task x aux product; the variants rotate
MATRIX="margin margin full
margin proxy-anchor most-similar
margin none sampling
triplet-margin margin debias
triplet-margin proxy-anchor linear-assignment
triplet-margin none full
proxy-anchor margin full
proxy-anchor proxy-anchor debias
proxy-anchor none most-similar"

# -- 1. the venv -------------------------------------------------------------------
grep -v "not-cabrnet" "$ROOT/constraints.txt" > "$WORK/constraints-cabrnet.txt"
if ! (cd / && "$PY" -c "import torch, torchvision, cabrnet, yaml, pytest
assert torch.__version__.split('+')[0] == '2.14.1', torch.__version__
assert torchvision.__version__.split('+')[0] == '0.29.1', torchvision.__version__") 2>/dev/null; then
    step "creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --progress-bar off -c "$WORK/constraints-cabrnet.txt" torch torchvision
    "$VENV/bin/pip" install -q --progress-bar off -c "$WORK/constraints-cabrnet.txt" -e "$ROOT[cabrnet,test]"
fi

# -- 2. the editable install must be this tree, with this tree's entry points ---------
installed="$(cd / && "$PY" -c "import pathlib, protoknn_plugin, protoknn_plugin.adapters.cabrnet as a
from importlib.metadata import entry_points
print(pathlib.Path(protoknn_plugin.__file__).resolve().parents[1], pathlib.Path(a.__file__).resolve().parents[2],
      sorted(e.name for e in entry_points(group='protoknn_plugin.run_backends')))" 2>/dev/null || true)"
if [ "$installed" != "$ROOT $ROOT ['cabrnet']" ]; then
    step "pointing the editable install at $ROOT"
    "$VENV/bin/pip" install -q --progress-bar off --no-deps -e "$ROOT"
fi

# -- 3. tiny dataset, and the configs of every combination ---------------------------
step "tiny dataset and the configs of $(echo "$MATRIX" | wc -l) combinations in $WORK"
"$PY" - "$WORK" "$MATRIX" <<'EOF'
import sys
from pathlib import Path
from protoknn_plugin.adapters.cabrnet.make_tiny_dataset import write_configs, write_image_folder

work, matrix = Path(sys.argv[1]), [line.split() for line in sys.argv[2].splitlines()]
print("  images:", write_image_folder(work))
for task, aux, variant in matrix:
    write_configs(work / f"{task}+{aux}+{variant}", work,
                  {"task_loss": task, "aux_loss": aux, "cluster_variant": variant})
EOF

# -- 4. cabrnet train + evaluate, per combination -----------------------------------
run_combination() {  # $1 = task+aux+variant; writes $WORK/$1/{train,evaluate}.{out,time} and status
    local dir="$WORK/$1" status=ok TIMEFORMAT="%R %U %S"  # wall, user and system seconds
    if ! { time OMP_NUM_THREADS=1 "$VENV/bin/cabrnet" train -c "$dir/configs" -o "$dir/run" --device cpu \
            --overwrite --seed 0 --save-best val_set/accuracy max > "$dir/train.out" 2>&1; } 2> "$dir/train.time"; then
        status="train-failed"
    fi
    if [ "$status" = ok ] && ! { time OMP_NUM_THREADS=1 "$VENV/bin/cabrnet" evaluate -c "$dir/run/final" \
            --device cpu > "$dir/evaluate.out" 2>&1; } 2> "$dir/evaluate.time"; then
        status="evaluate-failed"
    fi
    echo "$status" > "$dir/status"
    echo "  done $1: $status"
}
step "cabrnet train (1 epoch) + cabrnet evaluate per combination, $JOBS at a time"
while read -r task aux variant; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    run_combination "$task+$aux+$variant" &
done <<< "$MATRIX"
wait

step "report"
"$PY" - "$WORK" "$MATRIX" <<'EOF'
import re, sys
from pathlib import Path

work, matrix = Path(sys.argv[1]), [line.split() for line in sys.argv[2].splitlines()]
def number(pattern, text):
    found = re.findall(pattern, text, re.M)
    return float(found[-1]) if found else None

failed, totals = 0, [0.0, 0.0]
print("  seconds as wall/cpu (cpu = user + system of the command)")
print(f"  {'task loss':<15}{'aux loss':<14}{'cluster':<19}{'train s':>9}{'eval s':>8}"
      f"{'val kNN':>9}{'test kNN':>9}{'reloaded':>9}  result")
for task, aux, variant in matrix:
    d = work / f"{task}+{aux}+{variant}"
    status = (d / "status").read_text().strip()
    # (wall, cpu) seconds of each command; cpu = user + system, what a quiet machine needs
    secs = {}
    for part in ("train", "evaluate"):
        f = d / f"{part}.time"
        wall, user, system = map(float, f.read_text().split()[-3:]) if f.exists() else (0.0, 0.0, 0.0)
        secs[part] = (wall, user + system)
    totals[0] += secs["train"][0] + secs["evaluate"][0]
    totals[1] += secs["train"][1] + secs["evaluate"][1]
    train_s = f"{secs['train'][0]:.0f}/{secs['train'][1]:.0f}"
    eval_s = f"{secs['evaluate'][0]:.0f}/{secs['evaluate'][1]:.0f}"
    train = (d / "train.out").read_text()
    evaluate = (d / "evaluate.out").read_text() if (d / "evaluate.out").exists() else ""
    val = number(r"val_set/accuracy: ([0-9.]+)", train)
    test = number(r"Metrics on test set:.*?test_set/accuracy: ([0-9.]+)", train)
    reloaded = number(r"test_set/accuracy: ([0-9.]+)\s*$", evaluate)
    if status == "ok" and (val is None or test is None or reloaded is None):
        status = "no-accuracy-in-output"
    # the train log prints 3 decimals, evaluate 2: equal up to that rounding
    elif status == "ok" and abs(test - reloaded) > 0.0051:
        status = "reloaded-accuracy-differs"
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    print(f"  {task:<15}{aux:<14}{variant:<19}{train_s:>9}{eval_s:>8}{fmt(val):>9}{fmt(test):>9}{fmt(reloaded):>9}  {status}")
    if status != "ok":
        failed += 1
        log = d / ("evaluate.out" if status == "evaluate-failed" else "train.out")
        print("\n".join("      " + line for line in log.read_text().splitlines()[-15:]))
print(f"  train + evaluate, all combinations: {totals[0]:.0f} s wall summed over runs, {totals[1]:.0f} s cpu")
print(f"  {len(matrix) - failed} passed, {failed} failed" if failed else f"  all {len(matrix)} combinations passed")
sys.exit(1 if failed else 0)
EOF

# -- 5. the adapter's tests ----------------------------------------------------------
step "pytest tests/test_cabrnet_adapter.py in $VENV"
cd "$ROOT"
set +e
"$PY" -m pytest tests/test_cabrnet_adapter.py -q -p no:cacheprovider 2>&1 | tee "$WORK/pytest.out"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || exit "$status"
if grep -qE "[0-9]+ skipped" "$WORK/pytest.out"; then
    echo "cabrnet_ci: tests skipped inside $VENV, where CaBRNet is installed" >&2; exit 1
fi
step "done"
