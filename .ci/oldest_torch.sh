#!/usr/bin/env bash
# The distributed tests on the oldest torch that setup.py allows (torch 2.9.1), in a venv of its own.
#
#     bash .ci/oldest_torch.sh [VENV]        # default VENV: ../venv-oldest-torch (created on first use)
#
# Why 2.9: torch 2.6 cannot run FSDP2 on CPU at all ('Stream' object has no attribute 'record_event'), and
# 2.7 and 2.8 sum FSDP2's gloo gradient reduce-scatter instead of averaging it (the gradient and its norm are
# world-size times too large on CPU ranks). 2.6-2.9 also return clip_grad_norm_'s norm as a partial DTensor
# (pathfm.train.clip_gradients takes its full tensor). Measured: see README.md, "Testing on the oldest torch".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-../venv-oldest-torch}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch==2.9.1" "torchvision==0.24.1"
"$VENV/bin/pip" install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_fsdp.py tests/test_rank_faults.py tests/test_dist.py
