#!/usr/bin/env bash
# ProtoKNN inside CaBRNet, end to end, in its own venv (CaBRNet pins scikit-learn 1.5
# and pillow < 11 and weighs about 1.4 GB, so it never enters the main .venv).
#
#   bash tests/cabrnet_ci.sh
#
# 1. creates the venv if missing or broken (torch 2.14.1 / torchvision 0.29.1, then the
#    extra: pip install -e '.[cabrnet,test]'); about 8 minutes the first time;
# 2. points its editable install at this tree if it points elsewhere (a CI clone);
# 3. writes the tiny animals image folder and configs (make_tiny_dataset.py);
# 4. `cabrnet train` for one epoch on the CPU with our configs, then `cabrnet evaluate`
#    on the saved `final` checkpoint, and checks that the reloaded model's kNN accuracy
#    equals the one at the end of training (the memory bank travels in the checkpoint);
# 5. pytest tests/test_cabrnet_adapter.py inside that venv (no test may skip there).
#
# Environment: PROTOKNN_CABRNET_VENV (default <repo>/.venv-cabrnet),
# PROTOKNN_CABRNET_WORK (default: a fresh temporary folder, removed at exit).
set -euo pipefail

started=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PROTOKNN_CABRNET_VENV:-$ROOT/.venv-cabrnet}"
PY="$VENV/bin/python"
if [ -n "${PROTOKNN_CABRNET_WORK:-}" ]; then
    WORK="$PROTOKNN_CABRNET_WORK"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
step() { echo "== cabrnet_ci: $* ($(( $(date +%s) - started )) s)"; }

# -- 1. the venv -------------------------------------------------------------------
if ! (cd / && "$PY" -c "import torch, torchvision, cabrnet, yaml, pytest
assert torch.__version__.split('+')[0] == '2.14.1', torch.__version__
assert torchvision.__version__.split('+')[0] == '0.29.1', torchvision.__version__") 2>/dev/null; then
    step "creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --progress-bar off torch==2.14.1 torchvision==0.29.1
    "$VENV/bin/pip" install --progress-bar off -e "$ROOT[cabrnet,test]"
fi

# -- 2. the editable install must be this tree ---------------------------------------
installed="$(cd / && "$PY" -c "import pathlib, protoknn_plugin, protoknn_plugin.adapters.cabrnet as a
print(pathlib.Path(protoknn_plugin.__file__).resolve().parents[1], pathlib.Path(a.__file__).resolve().parents[2])" 2>/dev/null || true)"
if [ "$installed" != "$ROOT $ROOT" ]; then
    step "pointing the editable install at $ROOT"
    "$VENV/bin/pip" install --progress-bar off --no-deps -e "$ROOT"
fi

# -- 3. tiny dataset + configs -------------------------------------------------------
step "tiny dataset in $WORK"
"$PY" -m protoknn_plugin.adapters.cabrnet.make_tiny_dataset "$WORK"

# -- 4. cabrnet train + evaluate -----------------------------------------------------
step "cabrnet train (1 epoch, CPU)"
if ! "$VENV/bin/cabrnet" train -c "$WORK/configs" -o "$WORK/run" --device cpu --overwrite \
        > "$WORK/train.out" 2>&1; then
    tail -n 40 "$WORK/train.out"; echo "cabrnet_ci: cabrnet train failed" >&2; exit 1
fi
grep -E "Metrics at epoch|Metrics on test set" "$WORK/train.out" | sed 's/^.* - /  /'

step "cabrnet evaluate (reloads run/final)"
if ! "$VENV/bin/cabrnet" evaluate -c "$WORK/run/final" --device cpu > "$WORK/evaluate.out" 2>&1; then
    tail -n 40 "$WORK/evaluate.out"; echo "cabrnet_ci: cabrnet evaluate failed" >&2; exit 1
fi
grep -E "test_set/accuracy" "$WORK/evaluate.out" | sed 's/^.* - /  /'
"$PY" - "$WORK/train.out" "$WORK/evaluate.out" <<'EOF'
import re, sys
train, evaluate = (open(path).read() for path in sys.argv[1:])
at_end = re.search(r"Metrics on test set:.*?test_set/accuracy: ([0-9.]+)", train)
reloaded = re.search(r"test_set/accuracy: ([0-9.]+)\s*$", evaluate, re.M)
if not (at_end and reloaded):
    sys.exit("cabrnet_ci: no test_set/accuracy in the train or evaluate output")
# the train log prints 3 decimals, evaluate 2: equal up to that rounding
if abs(float(at_end.group(1)) - float(reloaded.group(1))) > 0.0051:
    sys.exit(f"cabrnet_ci: accuracy after training {at_end.group(1)} != after reloading {reloaded.group(1)}")
print(f"  kNN accuracy after training {at_end.group(1)}, after reloading the checkpoint {reloaded.group(1)}: equal")
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
