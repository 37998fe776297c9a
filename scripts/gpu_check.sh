#!/usr/bin/env bash
# The GPU checks and benchmarks on a CUDA machine whose own Python already has torch but not this
# project's other dependencies (a lent accelerator; CI has no GPU and skips these tests).
#
#   bash scripts/gpu_check.sh wheels [PYTHON_VERSION]   # here: download the pure-Python and binary wheels
#                                                       # the GPU code needs into .whl/ (default 3.12)
#   bash scripts/gpu_check.sh run [SECTIONS]            # there: install .whl/ into /tmp/site, run the GPU
#                                                       # tests, bench/runtime_gpu.py and the nodule detector
#
# torch, numpy and scipy are the machine's own (never downloaded: a CUDA torch is several GB).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(fastapi starlette pydantic pydantic_core pydantic-settings annotated-types typing-inspection
        python-dotenv python-multipart orjson opentelemetry-api monai typing_extensions anyio pydicom
        pyjpegls pylibjpeg pylibjpeg-openjpeg prometheus_client py-spy)

pinned() {  # name==version as installed in this checkout's venv, so both machines run the same code
    .venv/bin/pip list --format=freeze 2>/dev/null | grep -i -E "^$(echo "$1" | sed 's/[-_]/[-_]/g')==" || echo "$1"
}

case "${1:-}" in
  wheels)
    version="${2:-3.12}"
    mkdir -p .whl
    specs=(); for name in "${WHEELS[@]}"; do specs+=("$(pinned "$name")"); done
    .venv/bin/pip download --quiet --no-deps --only-binary=:all: --dest .whl --python-version "$version" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any "${specs[@]}"
    echo "wheels for Python $version in .whl/ ($(du -sh .whl | cut -f1)); carry .whl to the GPU machine"
    ;;
  run)
    sections="${2:-costs,volume,fusion,sensor,oom}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -m pytest -q --noconftest -p no:cacheprovider -o addopts="-ra" tests/model_runtime/test_gpu_paths.py || true
    python3 bench/runtime_gpu.py --sections "$sections"
    python3 bench/nodule.py --sections detector --device cuda || true
    ;;
  *)
    sed -n '2,10p' "$0"; exit 2
    ;;
esac
