#!/usr/bin/env bash
# One device call for issue #18 (see bench/extract_gpu.py): install the carried nvImageCodec
# wheels, run the GPU bench, then the CUDA tests. Results land in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl 2>&1 | tail -2
python3 -c "import torch, torchvision, h5py, typer; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
python3 -c "from importlib.metadata import version; print('nvimgcodec', version('nvidia-nvimgcodec-cu13'))"
nproc; df -h /dev/shm | tail -1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,utilization.gpu,memory.used --format=csv,noheader
timeout "${BENCH_TIMEOUT:-400}" python3 bench/extract.py --device cuda --out-json "$OUT/bench.json" --budget "${BENCH_BUDGET:-330}" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^W1\|warn"
timeout "${TEST_TIMEOUT:-130}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device_feed.py 2>&1 | tee "$OUT/pytest.log" | tail -25
