#!/usr/bin/env bash
# The optional CUDA path, compiled with this machine's nvcc so that it can never rot (no GPU needed), then
# loaded beside the installed package and tested: tests/test_cuda.py's kernel tests skip with their reason
# where there is no GPU and run where there is one. Every kernel is compiled (all head-dim buckets, mask
# kinds and dtypes) for sm_80 and sm_90, or CUDA_ARCHS="..." (e.g. CUDA_ARCHS=86 for one local GPU).
#
#   bash scripts/check_cuda_build.sh [pytest args]      # after `pip install ".[test]"`
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
if ! command -v nvcc >/dev/null; then
  echo "check_cuda_build: nvcc not found: this check compiles the CUDA path and needs a CUDA toolkit" >&2
  exit 1
fi
nvcc --version | tail -n 2
build=$(mktemp -d "${TMPDIR:-/tmp}/fusedattn-cuda.XXXXXX")
trap 'rm -rf "$build"' EXIT

start=$SECONDS
if ! cmake -S . -B "$build" -DFUSEDATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
     -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" ${CUDA_ARCHS:+"-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS"} \
     >"$build/configure.log" 2>&1; then
  cat "$build/configure.log" >&2
  exit 1
fi
cmake --build "$build" --target _cuda -j "$(nproc 2>/dev/null || echo 2)"
echo "check_cuda_build: compiled fusedattn._cuda in $((SECONDS - start)) s"
module=$(ls "$build"/_cuda*.so)
# The device code each architecture gets (one cubin per sm_XX).
for tool in cuobjdump "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump"; do
  if command -v "$tool" >/dev/null; then "$tool" --list-elf "$module"; break; fi
done

# The installed package (from `pip install .`) plus the module just built, outside the source tree.
package=$(cd / && python -c "import fusedattn, os; print(os.path.dirname(fusedattn.__file__))")
mkdir -p "$build/site"
cp -r "$package" "$build/site/fusedattn"
cp "$module" "$build/site/fusedattn/"
cd /
PYTHONPATH="$build/site" python -c "
import fusedattn as fa
info = fa.backend_info()['cuda']
print('check_cuda_build: backend_info()[\"cuda\"] =', info)
assert info['built'], info
"
PYTHONPATH="$build/site" python -m pytest -q -p no:cacheprovider -rs "$root/tests/test_cuda.py" "$@" | tail -n 25
