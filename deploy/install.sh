#!/usr/bin/env bash
# Installs what is missing, and nothing else: Debian's packages for Orthanc (Python, DICOMweb and PostgreSQL index
# plugins), PostgreSQL (a stack with orthanc_index "postgresql" runs its own cluster), DCMTK, Redis, dicom3tools and
# chromium (which the browser tests drive); then the virtual environment .venv, made from
# Debian's Python 3.11 (the interpreter Orthanc's Python plugin embeds, so the plugin imports the same packages),
# torch from this machine's CPU wheel first, then the project under constraints.txt. Quick when everything is there.
# GPU=1 (`make install GPU=1`, on a host with NVIDIA GPUs) installs PyPI's torch (a CUDA build) and faiss-gpu in
# place of faiss-cpu (the extra "gpu"); the default stays CPU-only.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(orthanc orthanc-python orthanc-dicomweb orthanc-postgresql postgresql dcmtk redis-server dicom3tools
              python3.11-venv chromium)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

VENV=.venv
GPU=${GPU:-0}
STAMP=$VENV/.installed
want=$( (cat pyproject.toml constraints.txt; echo "GPU=$GPU") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
if [ ! -x $VENV/bin/python ]; then
  echo "install: virtual environment $VENV (Debian's /usr/bin/python3.11)"
  /usr/bin/python3.11 -m venv $VENV
fi
PIP=($VENV/bin/python -m pip install -q)
if [ "$GPU" = 1 ]; then
  echo "install: python packages, GPU build (torch with CUDA, faiss-gpu)"
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" -c constraints.txt -e '.[test,gpu]'
  # faiss-cpu (a dependency) and faiss-gpu install the same module: drop the first, then restore the second's files.
  $VENV/bin/python -m pip uninstall -q -y faiss-cpu
  "${PIP[@]}" --force-reinstall --no-deps -c constraints.txt faiss-gpu
else
  echo "install: python packages"
  # The CPU build of torch lies in /opt/wheels on these machines; named explicitly so that no environment variable
  # is needed for pip to find it (PyPI's torch is a CUDA build of several GB).
  FIND_LINKS=(); [ -d /opt/wheels ] && FIND_LINKS=(--find-links /opt/wheels)
  "${PIP[@]}" "${FIND_LINKS[@]}" torch==2.13.0
  "${PIP[@]}" -c constraints.txt -e '.[test]'
  if $VENV/bin/python -m pip show -q faiss-gpu >/dev/null 2>&1; then  # back from a GPU install
    $VENV/bin/python -m pip uninstall -q -y faiss-gpu
    "${PIP[@]}" --force-reinstall --no-deps -c constraints.txt faiss-cpu
  fi
fi
echo "$want" > "$STAMP"
