#!/usr/bin/env bash
# The wheel is the product. Build the sdist and the wheel, install the wheel into a fresh venv
# that already holds torch, with constraints.txt and nothing else from this tree, and use it
# from an empty folder as a user would.
#
#   bash tests/wheel_ci.sh          (after `make setup`: the build runs in .venv)
#
# 1. `python -m build`: the sdist, then the wheel built from that sdist (so the sdist is
#    complete), into a temporary dist/;
# 2. a fresh venv with torch and torchvision at the versions of constraints.txt (a user's
#    environment already holds torch);
# 3. from an empty folder: pip install the wheel with -c constraints.txt. torch must be
#    the one that was there, and protoknn_plugin must import from the venv, not this tree;
# 4. `protoknn heads`, `protoknn datasets`, a 1-epoch `protoknn train --limit` on the
#    embedded animals data and `protoknn evaluate` on it; and a backbone of a missing extra
#    (efficientnet-lite0 without `pretrained`) ends in one line naming the extra, exit 2.
#
# Environment: PROTOKNN_BUILD_PYTHON (default <repo>/.venv/bin/python; needs `build`, in the
# test extra), PROTOKNN_WHEEL_WORK (default: a fresh temporary folder, removed at exit).
set -euo pipefail

started=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_PY="${PROTOKNN_BUILD_PYTHON:-$ROOT/.venv/bin/python}"
if [ -n "${PROTOKNN_WHEEL_WORK:-}" ]; then
    WORK="$PROTOKNN_WHEEL_WORK"
    rm -rf "$WORK" && mkdir -p "$WORK"
else
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
step() { echo "== wheel_ci: $* ($(( $(date +%s) - started )) s)"; }
fail() { echo "wheel_ci: $*" >&2; exit 1; }

# -- 1. sdist + wheel ----------------------------------------------------------------
step "python -m build (sdist, then the wheel from it)"
"$BUILD_PY" -m build --outdir "$WORK/dist" "$ROOT" > "$WORK/build.out" 2>&1 || { tail -n 30 "$WORK/build.out"; fail "build failed"; }
WHEEL="$(ls "$WORK"/dist/protoknn_plugin-*.whl)"
SDIST="$(ls "$WORK"/dist/protoknn_plugin-*.tar.gz)"
echo "  $(basename "$SDIST") $(du -k "$SDIST" | cut -f1) kB, $(basename "$WHEEL") $(du -k "$WHEEL" | cut -f1) kB"

# -- 2. a fresh venv that already holds torch ----------------------------------------
step "fresh venv with torch and torchvision from constraints.txt"
python3 -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --progress-bar off -c "$ROOT/constraints.txt" torch torchvision
torch_before="$("$VPY" -m pip show torch | sed -n 's/^Version: //p')"

# -- 3. the wheel, from an empty folder ----------------------------------------------
mkdir "$WORK/empty" && cd "$WORK/empty"
step "pip install $(basename "$WHEEL") -c constraints.txt (torch $torch_before)"
"$VPY" -m pip install -q --progress-bar off -c "$ROOT/constraints.txt" "$WHEEL"
torch_after="$("$VPY" -m pip show torch | sed -n 's/^Version: //p')"
[ "$torch_before" = "$torch_after" ] || fail "installing the wheel replaced torch $torch_before by $torch_after"
where="$("$VPY" -c "import protoknn_plugin; print(protoknn_plugin.__file__)")"
case "$where" in "$WORK/venv/"*) ;; *) fail "protoknn_plugin imports from $where, not from the venv";; esac
echo "  torch $torch_after kept; protoknn_plugin from $where"
extras="$("$VPY" -c "import importlib.util as u; print([m for m in ('efficientnet_lite_pytorch', 'tensorboard', 'cabrnet', 'pytest') if u.find_spec(m)])")"
[ "$extras" = "[]" ] || fail "the plain wheel pulled in optional packages: $extras"

# -- 4. the CLI, as a user runs it ---------------------------------------------------
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
step "protoknn heads / datasets"
"$WORK/venv/bin/protoknn" heads > heads.out
grep -q "protoknn" heads.out || fail "protoknn heads lists no protoknn head"
"$WORK/venv/bin/protoknn" datasets > datasets.out
grep -q "animals" datasets.out || fail "protoknn datasets lists no animals"
step "protoknn train --limit 200 --epochs 1, then evaluate"
"$WORK/venv/bin/protoknn" train --head protoknn --dataset animals --limit 200 --epochs 1 --prototypes 20 --dim 16 --backbone-opt width=8 \
    --batch-classes 10 --per-class 4 --device cpu --out run > train.out 2>&1 || { tail -n 20 train.out; fail "train failed"; }
[ -f run/checkpoint.pt ] || fail "train wrote no run/checkpoint.pt"
"$WORK/venv/bin/protoknn" evaluate run --device cpu > evaluate.out 2>&1 || { tail -n 20 evaluate.out; fail "evaluate failed"; }
grep -E "k=5" evaluate.out | head -n 3 | sed 's/^/  /'
step "a missing extra is one line"
set +e
"$WORK/venv/bin/protoknn" train --backbone efficientnet-lite0 --limit 40 --epochs 1 --device cpu --out run-lite \
    > lite.out 2>&1
code=$?
set -e
[ "$code" -eq 2 ] && [ "$(wc -l < lite.out)" -eq 1 ] && grep -q "protoknn-plugin\[pretrained\]" lite.out \
    || { cat lite.out; fail "efficientnet-lite0 without the extra: expected one line naming protoknn-plugin[pretrained], exit 2 (got $code)"; }
sed 's/^/  /' lite.out
step "done"
