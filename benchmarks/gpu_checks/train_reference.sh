#!/usr/bin/env bash
# Train the shipped reference DiT and its evaluator classifier on one GPU, then check them.
#
#     bash benchmarks/gpu_checks/train_reference.sh OUT_DIR [MINUTES]
#
# The recipe behind ras_compile/reference/weights/: the DiT for at most MINUTES minutes
# (default 4.5) of batches of 128 made by 14 loader processes (the synthetic generator is
# CPU work), the classifier for 2500 steps (at most 1.5 minutes), then 512 dense 28-step
# samples classified (guidance 1, 2 and 4). The DiT run resumes from OUT_DIR/model/
# training_state.pt when it exists, so the budget can be split over several calls (keep
# that file between them), and logs the label gap every 1000 steps (see
# ras_compile/reference/check.py: near zero means the model still ignores its class).
# The same commands with --device cpu (and no --workers) train on a CPU, in hours
# instead of minutes.
set -euo pipefail
OUT=${1:?usage: train_reference.sh OUT_DIR [MINUTES]}
MINUTES=${2:-4.5}
mkdir -p "$OUT"
python3 -m ras_compile.reference.train --out "$OUT/model" --device cuda --workers 14 \
    --batch-size 128 --lr 1e-3 --warmup-steps 200 --steps 100000 --minutes "$MINUTES" --log-every 500 \
    --resume --gap-every 1000
python3 -m ras_compile.reference.evaluator --out "$OUT/model" --device cuda --workers 14 \
    --batch-size 256 --steps 2500 --minutes 1.5
python3 -m ras_compile.reference.check --model "$OUT/model" --classifier "$OUT/model/classifier.safetensors" \
    --device cuda --samples 512 --guidance 1.0 2.0 4.0 --json "$OUT/model/check.json"
python3 - "$OUT/model" <<'PY'
import sys, torch
from ras_compile.reference.images import save_image_grid
from ras_compile.reference.model import load_reference_model
from ras_compile.reference.sampling import sample
m = load_reference_model(sys.argv[1]).cuda()
labels = torch.arange(8).repeat(4)
save_image_grid(sample(m, labels, steps=28, seed=0).cpu(), sys.argv[1] + "/preview.png", nrow=8, scale=3)
PY
