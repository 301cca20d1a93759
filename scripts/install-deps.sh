#!/usr/bin/env bash
# Install everything iteris-mpi needs from Debian's apt. Idempotent: does nothing when all is there.
# Usage: scripts/install-deps.sh [--slurm] [--python]
#   --slurm   also install slurm-wlm and munge (needed by `make test-slurm`)
#   --python  also install python3-numpy / python3-h5py / python3-sentencepiece (independent reference checks in
#             the tests; tests/e2e/tokenize_spm.sh is skipped without python3-sentencepiece)
set -euo pipefail

pkgs=(openmpi-bin libopenmpi-dev libscalapack-openmpi-dev libopenblas-dev liblapacke-dev
      petsc-dev libhdf5-openmpi-dev hdf5-tools libgtest-dev libcjson-dev pkg-config
      libpcre2-dev libicu-dev python3-regex  # tokenizer.json: regexes, NFC; tests/ref/hf_bpe_ref.py
      gcc g++ gfortran make gnuplot-nox python3-numpy time
      clang libclang-rt-14-dev)  # clang + libFuzzer: make fuzz
for a in "$@"; do
  case "$a" in
    --slurm) pkgs+=(slurm-wlm munge) ;;
    --python) pkgs+=(python3-numpy python3-h5py python3-sentencepiece) ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "install-deps: unknown argument '$a' (try --help)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#pkgs[@]} packages present"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-deps: done"
