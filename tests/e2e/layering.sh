#!/usr/bin/env bash
# No call or include cycle among the files of src/, and every layer calls only the layers below it
# (tests/e2e/layering.py reads the object files with nm and the sources' #include lines).
# Env: ITERIS_BUILD (the build folder; default build).
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=${ITERIS_BUILD:-build}
/usr/bin/python3 tests/e2e/layering.py "$BUILD/obj" src include
