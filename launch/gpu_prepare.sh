#!/usr/bin/env bash
# Fill .device/te/ (ignored by git) with what launch/gpu_check.sh installs on a GPU machine that has no
# network: Transformer Engine's core wheel (also cut in pieces p0 q0.. of < 64 MiB, for transfer
# limits), the TE PyTorch extension's source (compiled there, ~2 min on 16 cores), megatron-core,
# webdataset and pytest with their dependencies. Run where pip can reach PyPI:
#   bash launch/gpu_prepare.sh [EXTRA==VERSION ...]     (TE_VERSION, GPU_PYTHON default 2.20.2, 3.12)
# Same procedure as ../shared/device/te-prepare, plus the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
TE=${TE_VERSION:-2.20.2}
PYV=${GPU_PYTHON:-3.12}
MCORE=$(grep -oP 'megatron-core==\K[0-9.]+' setup.cfg)  # the release setup.cfg pins (0.19.2)
out=.device/te
mkdir -p "$out/small" "$out/full"
plat=(--only-binary=:all: --python-version "$PYV" --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
dl() { python3 -m pip download -q --no-deps "${plat[@]}" -d "$1" "${@:2}"; }
core=transformer_engine_cu13-$TE-py3-none-manylinux_2_28_x86_64.whl
[ -f "$out/full/$core" ] || dl "$out/full" "transformer-engine-cu13==$TE"
dl "$out/small" "transformer-engine==$TE" pydantic pydantic-core annotated-types typing-inspection \
   typing-extensions nvdlfw-inspect nvidia-cudnn-frontend importlib-metadata "megatron-core==$MCORE" \
   webdataset braceexpand pytest pluggy iniconfig "$@"
sdist="$out/small/transformer_engine_torch-$TE.tar.gz"
if [ ! -f "$sdist" ]; then  # source only on PyPI; `pip download` would try to build it here
  url=$(curl -s --max-time 60 "https://pypi.org/simple/transformer-engine-torch/" \
        | grep -o "https://[^\"#]*transformer_engine_torch-$TE.tar.gz" | head -1)
  curl -s --max-time 300 -o "$sdist" "$url"
fi
f="$out/full/$core"
head -c 46137344 "$f" > "$out/p0"
tail -c +46137345 "$f" | split -b 57596358 -d -a 1 - "$out/q"
sha256sum "$f" | cut -d' ' -f1 > "$out/small/core.sha256"
echo "$core" > "$out/small/core.name"
du -sh "$out/small" "$out"/p0 "$out"/q*
echo "ready: on the GPU machine, bash launch/gpu_check.sh"
