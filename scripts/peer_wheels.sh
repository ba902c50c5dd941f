#!/usr/bin/env bash
# The peers the benchmarks compare with (TRL, Unsloth), unpacked into .whl/site for the GPU machine,
# which has no package registry: carry `.whl` with the device call and pass `--peer-path .whl/site`
# (bench/grpo_step.py) or `--trl-path/--unsloth-path .whl/site` (bench/memory.py); with `PYTHONPATH=src:.whl/site`
# gguf (ahazero's own dependency, not on the GPU machines) lets tests/test_linear4bit.py collect there. About 41 MB: the parts
# those runs do not load are left out (Unsloth's studio/, bitsandbytes' other CUDA builds, torchao's
# optional CUTLASS/MX kernels, hf_transfer) so the working tree stays under the 64 MiB a call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
raw=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$raw" \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 bitsandbytes==0.50.2 torchao==0.18.0 trl==1.15.0 datasets==4.8.5 \
  dill multiprocess tyro docstring-parser typeguard shtab cut_cross_entropy msgspec gguf
rm -rf .whl/site && mkdir -p .whl/site
for w in "$raw"/*.whl; do unzip -q -o "$w" -d .whl/site; done
cd .whl/site
rm -rf studio test torchao/_C_cutlass_90a.abi3.so torchao/_C_mxfp8*.so
find bitsandbytes -name "*.so" ! -name "libbitsandbytes_cuda130.so" -delete
du -sh .
