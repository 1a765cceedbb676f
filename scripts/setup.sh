#!/usr/bin/env bash
# Creates .venv and installs evo into it. Idempotent; used by both README commands and CI.
# On a machine without an NVIDIA GPU the pinned CPU build of torch goes in first, so pip never
# pulls a multi-GB CUDA build; with a GPU, pip's default (CUDA) build is used. Override with
# EVO_TORCH_SPEC (e.g. EVO_TORCH_SPEC='torch==2.14.1').
# bubblewrap (the sandbox around each variant) is installed with apt-get where this runs as root
# on Debian/Ubuntu; elsewhere evo says how to install it and runs variants unsandboxed meanwhile.
# chromium (only for the browser test of `evo report`) is installed the same way, or that test skips.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# apt_install PACKAGE WHAT_FOR WITHOUT_IT: install a Debian package as root, else say how and what is lost.
apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $1 ($2)"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null 2>&1; }; } ||
      echo "setup: could not install $1; $3" >&2
  else
    echo "setup: $1 is not installed, so $3." >&2
    echo "       Install it: sudo apt-get install $1 (or dnf/pacman install $1)" >&2
  fi
}
if ! command -v bwrap >/dev/null 2>&1; then
  apt_install bubblewrap "the sandbox evo runs variants in" "variants will run unsandboxed until it is installed (evo warns once per run)"
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  apt_install chromium "the tests open evo report's page in it" "the browser test of evo report will skip"
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${EVO_TORCH_SPEC:-}" ]; then
    "${pip[@]}" install "$EVO_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install torch
  else
    "${pip[@]}" install torch==2.13.0
  fi
fi
"${pip[@]}" install -e ".[dev]"
.venv/bin/python -c "import evo, prepare, trainer, torch" || { echo "setup: evo did not install" >&2; exit 1; }
