#!/usr/bin/env bash
# System libraries that PyPI cannot provide, installed only where missing.
#   libgfortran5: needed by cmeel-openblas's libopenblas (the fast CPU BLAS on Linux).
#   chromium:     the browser the web-page tests drive (only with the argument "test").
#   curl:         the README's curl example is run by a test (only with the argument "test").
#   cmake, g++:   build lmx's CPU kernels (C++ MLX extension; Linux x86_64 without an NVIDIA GPU).
# Without root or apt-get it says what is missing and carries on: lmx then runs with
# MLX's bundled BLAS (slow) and the browser tests report that no browser is installed.
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
want=()
ldconfig -p 2>/dev/null | grep -q 'libgfortran\.so\.5' || want+=(libgfortran5)
if [ "$(uname -m)" = "x86_64" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  command -v cmake >/dev/null 2>&1 || want+=(cmake)
  command -v g++ >/dev/null 2>&1 || want+=(g++)
fi
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then want+=(chromium); fi
if [ "${1:-}" = "test" ] && ! command -v curl >/dev/null 2>&1; then want+=(curl); fi
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: please install ${want[*]} (no root/apt-get here); lmx works without them, slower" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null; } \
  || echo "note: could not install ${want[*]}" >&2
exit 0
