#!/usr/bin/env bash
# Download into benchmarks/wheels/ the wheels benchmarks/gpu_check.sh installs on a machine
# that has PyTorch but cannot reach a package index: kdcl's config stack (hydra-core,
# omegaconf and the ANTLR runtime they parse with; that one is published as a source archive
# only, so it is built into a wheel here), at the versions the tests pass with. Pure-Python
# wheels, about 0.4 MB in all. The folder is ignored by git: hand it to the machine with the
# working tree (docs/speed.md, "The GPU check").
#
# usage: benchmarks/gpu_wheels.sh [PYTHON]   (PYTHON: an interpreter with pip; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
wheels=benchmarks/wheels
rm -rf "$wheels"
mkdir -p "$wheels"
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "hydra-core==1.3.8" "omegaconf==2.3.1"
"$python" -m pip wheel --quiet --no-deps -w "$wheels" "antlr4-python3-runtime==4.9.3"
ls -l "$wheels"
du -sh "$wheels"
