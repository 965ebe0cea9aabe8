#!/usr/bin/env bash
# The GPU checks, in one run on a machine with an NVIDIA GPU (run it whenever one is at hand and
# record the card and the figures in docs/results.md):
#   1. a GPU training run: a Fashion-MNIST network and 8 FGE members on CUDA, exported with its
#      INT8 and FP16 variants (or ENSEMBLE=path/to/<name>/<version> to use one already exported);
#   2. onnxruntime's CUDA provider really runs the graphs (checked on the session, FP32 and FP16);
#   3. valley-serve on --device cuda, and its metrics say CUDAExecutionProvider;
#   4. benchmarks/ensemble_cost.py on CUDA at GPU-sized batches: single member, full (fused),
#      cascade, FP16 (and INT8), in process beside the server, with test accuracy, NLL and ECE.
#
#   bash benchmarks/gpu_check.sh [OUT]        # OUT: where results go (default runs/gpu-check)
#
# Environment: PYTHON (default .venv/bin/python), ENSEMBLE, EPOCHS (base epochs, default 24),
# DURATION (seconds per throughput cell, default 8), SCENARIOS (default "64x8 256x4").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
PYTHON=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PYTHON")
EPOCHS=${EPOCHS:-24}
DURATION=${DURATION:-8}
SCENARIOS=${SCENARIOS:-"64x8 256x4"}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1

echo "== machine"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU here"; exit 1; }
"$PYTHON" -c "import torch, onnxruntime; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

if [[ -z "${ENSEMBLE:-}" ]]; then
  echo "== 1. GPU training run: base $EPOCHS epochs, 8 FGE cycles of 1 epoch, export with INT8 and FP16"
  start_epoch=$((EPOCHS * 2 / 3))
  time "$BIN/valley-train" train --dataset fashion-mnist --model cnn --epochs "$EPOCHS" --save-epoch "$start_epoch" \
    --device cuda --out "$OUT/base"
  time "$BIN/valley-train" fge --from "$OUT/base" --start-epoch "$start_epoch" --cycles 8 --cycle-epochs 1 \
    --lr1 0.01 --lr2 0.0005 --device cuda --out "$OUT/fge"
  time "$BIN/valley-train" export --from "$OUT/fge" --name fashion-mnist-fge --version 1 --out "$OUT/ensembles" \
    --precision int8 --precision fp16 --overwrite
  ENSEMBLE="$OUT/ensembles/fashion-mnist-fge/1"
fi

echo "== 2. onnxruntime's CUDA provider runs the graphs"
"$PYTHON" - "$ENSEMBLE" <<'PY'
import sys
from pathlib import Path

from service.core.ensemble import CUDA, load_ensemble

for precision in ("fp32", "fp16"):
    ensemble = load_ensemble(Path(sys.argv[1]), device="cuda", precision=precision)
    assert ensemble.providers[0] == CUDA, ensemble.providers
    print(precision, "runs on", ensemble.providers[0], "samples within", ensemble.check_samples())
PY

echo "== 3. valley-serve --device cuda reports the CUDA provider"
"$PYTHON" - "$ENSEMBLE" <<'PY'
import sys
import urllib.request
from pathlib import Path

from service.launch import start_server

version = Path(sys.argv[1]).resolve()
with start_server(version.parent.parent, "--device", "cuda", "--load-models", version.parent.name) as server:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        lines = [line for line in response.read().decode().splitlines()
                 if line.startswith("valley_execution_provider_info{")]
    print("\n".join(lines))
    assert lines and all('provider="CUDAExecutionProvider"' in line for line in lines), lines
PY

echo "== 4. cost and quality on CUDA"
# shellcheck disable=SC2086
"$PYTHON" benchmarks/ensemble_cost.py --version-dir "$ENSEMBLE" --device cuda --scenarios $SCENARIOS \
  --configs single full cascade fp16-single fp16-full fp16-cascade int8-full int8-cascade \
  --valley-arg=--max-batch-size=512 --valley-arg=--max-queue-delay-ms=1 --duration "$DURATION" \
  --json "$OUT/ensemble-cost-cuda.json" --plot "$OUT/ensemble-cost-cuda.png"
echo "== done: $OUT"
