#!/usr/bin/env bash
# Fetch, on a machine with network, the pure-Python wheels the GPU machine lacks (its image has torch,
# numpy, opencv, pillow, typer, rich, requests, filelock, safetensors, einops, pytest) into .whl/,
# which git ignores and which the device run carries: `run(..., carry=[".whl"])`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl \
    spandrel==0.4.2 spandrel_extra_arches==0.2.0
ls -l .whl
