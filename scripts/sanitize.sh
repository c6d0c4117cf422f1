#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer: build the extension with FUSEDATTN_SANITIZE=ON into a
# fresh venv, then run the whole test suite against it with the ASan runtime preloaded.
#
# Why LD_PRELOAD: python itself is not instrumented, and ASan must intercept malloc & co. before any
# other library is loaded, so the runtime is preloaded (without it the module's import fails with "ASan
# runtime does not come first", and fusedattn would fall back to the NumPy reference: the script checks
# that the extension really is the one under test). libstdc++ is preloaded too: python does not link
# it, so when ASan initialises its __cxa_throw interceptor finds no real __cxa_throw, and the first C++
# exception thrown by any extension (matplotlib's ft2font does, on import) aborts with
# 'CHECK failed: ... real___cxa_throw != 0'. detect_leaks=0: CPython keeps interned objects and
# module state alive until exit by design, which LeakSanitizer would report by the thousand.
# Findings do not stop the run: ASan and UBSan write them to log files (log_path), and any log makes
# the script fail, printing the reports.
#
# Usage: scripts/sanitize.sh [pytest args]     (default: the whole suite, -q)
# Environment: PYTHON (default python3), CXX (default g++: its libasan is preloaded), WORK.
# Takes ~2-4x the plain suite's time (~2-3 minutes on 2 cores).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
CXX=${CXX:-g++}
WORK=${WORK:-$(mktemp -d /tmp/fusedattn-sanitize.XXXXXX)}
PYTEST_ARGS=("$@")
[[ ${#PYTEST_ARGS[@]} -eq 0 ]] && PYTEST_ARGS=(-q)

LIBASAN=$("$CXX" -print-file-name=libasan.so)
LIBSTDCXX=$("$CXX" -print-file-name=libstdc++.so)
if [[ ! -e "$LIBASAN" ]]; then
  echo "libasan.so not found next to $CXX (got '$LIBASAN'): install the compiler's ASan runtime (libasan)" >&2
  exit 2
fi
echo "== work directory: $WORK; ASan runtime: $LIBASAN"

rm -rf "$WORK/venv" "$WORK/suite" "$WORK"/asan.* "$WORK"/ubsan.*
"$PYTHON" -m venv "$WORK/venv"
VENV="$WORK/venv/bin"
"$VENV/python" -m pip install -q --upgrade pip
# RelWithDebInfo: -g for symbolised reports, and pybind11 does not strip the module. The core's own -O3
# still applies (CMakeLists.txt), so the code under test is the optimised kernels.
# On a CPU without AVX-512 the suite cannot run the AVX-512 levels, and their objects are most of an ASan
# build (on a 2-core AVX2-only Zen 1 they took over an hour and pushed CI past its limit): left out there.
AVX512=ON
grep -qw avx512f /proc/cpuinfo 2>/dev/null || AVX512=OFF
echo "== AVX-512 levels compiled: $AVX512"
CXX="$CXX" "$VENV/python" -m pip install -q "$ROOT[test]" \
  -Ccmake.define.FUSEDATTN_SANITIZE=ON -Ccmake.define.FUSEDATTN_AVX512=$AVX512 -Ccmake.build-type=RelWithDebInfo \
  -Cbuild-dir="$WORK/build"

export LD_PRELOAD="$LIBASAN $LIBSTDCXX"
export ASAN_OPTIONS="detect_leaks=0:log_path=$WORK/asan:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$WORK/ubsan"

mkdir -p "$WORK/suite"
cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$WORK/suite/"
[[ -d "$ROOT/examples" ]] && cp -r "$ROOT/examples" "$WORK/suite/"
# README.md and docs/: tests/test_docs_snippets.py runs their code blocks.
cp "$ROOT/README.md" "$WORK/suite/"
[[ -d "$ROOT/docs" ]] && cp -r "$ROOT/docs" "$WORK/suite/"
cd "$WORK/suite"
"$VENV/python" -c "
import fusedattn, sys
info = fusedattn.backend_info()
assert info['extension'], 'the sanitized extension did not load: the suite would test the NumPy fallback'
print('== under test:', fusedattn._backend._core.__file__, info)
"
status=0
"$VENV/python" -m pytest -p no:cacheprovider "${PYTEST_ARGS[@]}" || status=$?

shopt -s nullglob
reports=("$WORK"/asan.* "$WORK"/ubsan.*)
if ((${#reports[@]})); then
  echo "== sanitizer reports (${#reports[@]} files):"
  for report in "${reports[@]}"; do
    echo "---- $report"
    head -60 "$report"
  done
  status=1
else
  echo "== no ASan / UBSan report"
fi
echo "== sanitize: $( ((status)) && echo FAILED || echo clean ) (pytest exit $status), work files in $WORK"
exit $status
