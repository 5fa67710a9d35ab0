#!/usr/bin/env bash
# Download, HERE (a machine with PyPI access), the wheels that the GPU device image lacks, into the
# git-ignored folder .whl/ of the repository root; `benchmarks/gpu_suite.sh` installs them there.
#
#     bash benchmarks/gpu_wheels.sh            # then: du -sh .whl
#
# The device image (Python 3.12, x86-64) already has jax 0.11 (CUDA 13), flax, optax, orbax,
# tensorstore, einops, imageio, tqdm, pyyaml, numpy, matplotlib, protobuf, ... (its package list:
# the device tool's KINDS.md). This script resolves craftax, grain, wandb and imageio-ffmpeg
# with all their needs for CPython 3.12 manylinux x86_64 (pip's resolver, --dry-run --report),
# drops every package the image already holds, and downloads the rest with --no-deps, one
# version each, except SKIP (below). The wheels travel with the device call through
# `carry: [".whl"]` (they count towards the 64 MiB working-tree limit of a call).
# 2026-11-26: 23 wheels, 29 MiB (with SKIP="": 25 wheels, 70 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
# What must travel (versions = the ones this project tests with on CPU).
WANT=${WANT:-"craftax==1.6.1 grain==0.2.18 wandb==0.31.0 imageio-ffmpeg==0.6.0 zstandard==0.25.0"}
# Left behind by default: nothing the suite imports needs them, and with them the folder is 70 MiB,
# over a call's 64 MiB limit. pygame (14 MiB) serves only craftax's interactive play window;
# imageio-ffmpeg (29 MiB, an ffmpeg binary) only `dataset import-video`. SKIP="" takes them too
# (then carry .whl alone, nothing else large).
SKIP=${SKIP-"pygame imageio-ffmpeg"}
# Packages of the device image ('cuda', as KINDS.md lists them), normalised names. Never carried.
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform manylinux_2_5_x86_64 --platform any)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# 1. Resolve the whole tree for the device's Python and platform (metadata only, nothing installed).
# shellcheck disable=SC2086
"$PY" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --report "$tmp/report.json" --target "$tmp/t" \
    "${PLAT[@]}" $WANT 2> >(grep -v "is ignored: it is neither" >&2)
# 2. Keep the packages the image lacks.
"$PY" - "$tmp/report.json" "$IMAGE $SKIP" > "$tmp/need.txt" <<'EOF'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = {norm(n) for n in sys.argv[2].split()}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if norm(meta["name"]) not in image:
        print(f"{meta['name']}=={meta['version']}")
EOF
echo "carried packages: $(tr '\n' ' ' < "$tmp/need.txt")"
# 3. Download exactly those, one version each, without their needs (already in the list).
rm -rf "$DEST"
mkdir -p "$DEST"
# shellcheck disable=SC2046
"$PY" -m pip download -q --disable-pip-version-check --no-deps "${PLAT[@]}" -d "$DEST" $(cat "$tmp/need.txt") \
    2> >(grep -v "is ignored: it is neither" >&2)
cp "$tmp/need.txt" "$DEST/REQUIREMENTS.txt"
# 4. Craftax-Classic's texture cache (1.3 MB), built here if this machine's craftax lacks it: without
#    it the first Craftax renderer on the device spends about a minute of the collect part's budget
#    building it (the first two leases lost collect figures that way). Same craftax version both sides.
TEXPY=$PY
[ -x .venv/bin/python ] && TEXPY=.venv/bin/python  # the project's venv has craftax; python3 may not
"$TEXPY" - "$DEST" <<'EOF' || echo "no texture cache carried (craftax not importable here); the device builds it"
import shutil, sys
from craftax.craftax_classic import constants as c
from dreamer4.data.env import texture_cache
# builds it when missing, under a lock (a test or collect starting meanwhile may be building it too)
shutil.copy(texture_cache(c), sys.argv[1])
print("carried Craftax-Classic's texture cache")
EOF
n=$(ls "$DEST"/*.whl | wc -l)
echo "$n wheels in $DEST: $(du -sh "$DEST" | cut -f1) (a device call carries at most 64 MiB with the tree)"
