#!/usr/bin/env bash
# The GPU checks (issue 23), one script of at most ~8 minutes on one GPU, run from the repository root:
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# It prints everything it measured; docs/performance.md keeps one run's output with the GPU's name.
#   1. the GPU, torch and CUDA versions
#   2. tests/test_gpu.py: a training step of every family that logs nothing, run under
#      torch.cuda.set_sync_debug_mode("error") (no host-device synchronisation)
#   3. benchmarks/device_check.py: every family's fit, test and sample on CUDA in float32 and
#      bf16-mixed at the paper's width (64) for 300 steps; the corruptions and the sweep's rows on the
#      CPU and on CUDA for the same images
#   4. benchmarks/host_syncs.py on CUDA at widths 8 and 64
#   5. benchmarks/framework_overhead.py on CUDA: fae/bare and Lightning's floor at widths 64 and 8
#   6. benchmarks/precision_compile.py on CUDA: bf16 and compiled nets against float32
#   7. benchmarks/shared_device.py: 2 and 4 runs of the VAE and of the Fisher AE sharing the GPU against
#      one (the experiment runner's default is one run per GPU)
# PYTHON names the interpreter (default: .venv/bin/python if there, else python3). fae is imported from
# this checkout (PYTHONPATH), so it needs no install; its dependencies do. Where they are missing (a GPU
# image with torch and Lightning but no registry), make a folder of wheels on a machine that has one,
#   pip download --dest gpu-wheels 'jsonargparse[signatures]' wandb wandb-workspaces torch-fidelity submitit mlxtend
# (and leave torch out of it), carry it, and give WHEELS=gpu-wheels: they are installed with --no-index.
# Each part has its own time limit (LIMIT seconds, 150 by default); a failed part is named and the
# others still run; the exit status is 1 when any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LIMIT=${LIMIT:-150}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl || exit 1
fi
failed=()
part() {  # part NAME COMMAND...: runs COMMAND under the time limit, names it when it fails
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$LIMIT" "$@"
    local code=$?
    echo "== $name: exit $code after $((SECONDS - start)) s"
    [ "$code" -eq 0 ] || failed+=("$name")
}
part gpu "$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda)'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
part sync-debug "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py
part device-check "$PYTHON" benchmarks/device_check.py --accelerator cuda --steps 300
part host-syncs-8 "$PYTHON" benchmarks/host_syncs.py --accelerator cuda --width 8
part host-syncs-64 "$PYTHON" benchmarks/host_syncs.py --accelerator cuda --width 64
part overhead "$PYTHON" benchmarks/framework_overhead.py --accelerator cuda --widths 64 8 --steps 100 --warmup 10
part precision "$PYTHON" benchmarks/precision_compile.py --device cuda --steps 30 --warmup 5
part shared "$PYTHON" benchmarks/shared_device.py --accelerator cuda --families vae fisher --runs 2 4 --steps 200
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu check: FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu check: ok"
