#!/usr/bin/env python3
"""Check that AVX2 / AVX-512 / AVX512-BF16 / AMX instructions stay in the translation units compiled for them.

Usage: check_isa_objects.py BUILD_DIR   (a CMake build of the fusedattn_core and _core targets)

Why objects and not the wheel's .so: the module is stripped (pybind11 strips Release builds), so the .so
has no symbols to attribute an instruction to a translation unit; the objects do. Two rules:

1. Each object uses at most its own ISA: the portable objects (attention.cpp, cpu_features.cpp, probe.cpp,
   threading.cpp, attn_fwd_scalar.cpp, the bindings) no VEX / EVEX instruction at all (they run on any
   x86-64 before the dispatcher has looked at CPUID), attn_fwd_avx2.cpp no AVX-512, attn_fwd_avx512.cpp
   no AVX512-BF16 (Skylake-X and Ice Lake lack it), attn_fwd_amx_model.cpp (the software model of the
   tiles) no AMX and no BF16, attn_fwd_amx.cpp everything, and attn_fwd_avx512.cpp /
   attn_fwd_avx512bf16.cpp / attn_fwd_amx.cpp AVX-512 / BF16 / AMX instructions (a sanity check that the
   scan sees them).
2. No COMDAT leak: an inline function or template (std::vector's members, a header helper) instantiated in
   the AVX-512 object is compiled with AVX-512 flags too, and the linker keeps *one* copy of each such
   weak symbol for the whole library. If another object defines the same symbol, the linker may keep the
   AVX-512 copy and the portable code would then execute AVX-512 instructions on any CPU. So every symbol
   defined in several objects must use, in every copy, no more than the least capable object allows.

Exit status 0 when both hold; the table printed shows per object the instruction counts.
"""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

PORTABLE, AVX2, AVX512, AVX512BF16, AMX = 0, 1, 2, 3, 4
LEVEL_NAMES = {PORTABLE: "portable", AVX2: "avx2", AVX512: "avx512", AVX512BF16: "avx512bf16", AMX: "amx"}

HEADER = re.compile(r"^[0-9a-f]+ <(?P<name>[^>]+)>:$")
INSN = re.compile(r"^\s+[0-9a-f]+:\s+(?P<mnemonic>[a-z][a-z0-9.]*)\s*(?P<operands>.*)$")
# AVX-512 only: zmm registers, opmask registers, the upper 16 vector registers, embedded broadcast, and
# mask-register / EVEX-only mnemonics that can appear with xmm / ymm operands (AVX-512VL).
AVX512_OPERAND = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{1to\d+\}")
AVX512_MNEMONIC = re.compile(r"^(k(mov|and|or|xor|xnor|not|shift|ortest|test|unpck|add)|vpternlog|vperm[it]2|vrndscale|"
                             r"vscalef|vgetexp|vgetmant|vfixupimm|vfpclass|vrange|valign[dq]|vcompress|vexpand|"
                             r"vrcp14|vrsqrt14|vpro[lr][dq]|vpmovm2|vpmov[dq]2m|vpmov(q[dwb]|d[wb]|wb)\b)")


BF16_MNEMONIC = re.compile(r"^(vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16)")
AMX_MNEMONIC = re.compile(r"^(ldtilecfg|sttilecfg|tileloadd|tilestored|tilezero|tilerelease|tdp)")


def level_of(mnemonic: str, operands: str) -> int:
    if AMX_MNEMONIC.match(mnemonic):
        return AMX
    if BF16_MNEMONIC.match(mnemonic):
        return AVX512BF16
    if AVX512_OPERAND.search(operands) or AVX512_MNEMONIC.match(mnemonic):
        return AVX512
    if mnemonic.startswith("v"):  # every VEX-encoded instruction needs AVX at least
        return AVX2
    return PORTABLE


def allowed_level(obj: pathlib.Path) -> int:
    name = obj.name
    if "amx_model" in name:  # the software model of the tiles runs wherever the avx512 level does
        return AVX512
    if "amx" in name:
        return AMX
    if "avx512bf16" in name:
        return AVX512BF16
    if "avx512" in name:
        return AVX512
    if "avx2" in name:
        return AVX2
    return PORTABLE


def disassemble(obj: pathlib.Path) -> dict:
    """symbol -> highest ISA level used by its instructions."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], check=True, capture_output=True,
                          text=True).stdout
    levels, current = {}, None
    for line in text.splitlines():
        header = HEADER.match(line)
        if header:
            current = header.group("name")
            levels.setdefault(current, PORTABLE)
            continue
        insn = INSN.match(line)
        if insn and current is not None:
            levels[current] = max(levels[current], level_of(insn.group("mnemonic"), insn.group("operands")))
    return levels


def external_symbols(obj: pathlib.Path) -> set:
    """Defined symbols with external linkage (the only ones the linker can merge across objects)."""
    text = subprocess.run(["nm", "--defined-only", str(obj)], check=True, capture_output=True, text=True).stdout
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in ("T", "W", "V", "u", "i"):
            names.add(parts[2])
    return names


def main(build_dir: str) -> int:
    for tool in ("objdump", "nm"):
        if shutil.which(tool) is None:
            print(f"SKIP: {tool} not found (binutils)")
            return 0
    objects = sorted(p for p in pathlib.Path(build_dir).rglob("*.o") if "CMakeFiles" in p.parts
                     and "CompilerId" not in str(p))
    if not objects:
        print(f"no object files under {build_dir}", file=sys.stderr)
        return 2
    failures = []
    per_object, defined_in = {}, {}
    print(f"{'object':<40} {'allowed':>10} {'functions':>9} {'avx(2)':>7} {'avx512':>7} {'bf16':>5} {'amx':>5}")
    for obj in objects:
        if b".gnu.lto_" in obj.read_bytes()[:1 << 20] and not disassemble(obj):
            failures.append(f"{obj.name}: LTO bytecode only (configure with -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF)")
            continue
        levels = disassemble(obj)
        per_object[obj] = levels
        for symbol in external_symbols(obj) & set(levels):
            defined_in.setdefault(symbol, []).append(obj)
        counts = [sum(1 for lv in levels.values() if lv == level) for level in (AVX2, AVX512, AVX512BF16, AMX)]
        allowed = allowed_level(obj)
        print(f"{obj.name:<40} {LEVEL_NAMES[allowed]:>10} {len(levels):>9} {counts[0]:>7} {counts[1]:>7} "
              f"{counts[2]:>5} {counts[3]:>5}")
        for symbol, level in levels.items():
            if level > allowed:
                failures.append(f"{obj.name}: {symbol} uses {LEVEL_NAMES[level]} instructions")
        if allowed == AVX512 and counts[1] == 0:
            failures.append(f"{obj.name}: no AVX-512 instruction found: is the scan (or the build) broken?")
        if allowed == AMX and counts[3] == 0:
            failures.append(f"{obj.name}: no AMX instruction found: is the scan (or the build) broken?")
        if allowed == AVX512BF16 and counts[2] == 0:
            failures.append(f"{obj.name}: no AVX512-BF16 instruction found: is the scan (or the build) broken?")
    shared = {s: objs for s, objs in defined_in.items() if len(objs) > 1}
    for symbol, objs in sorted(shared.items()):
        floor = min(allowed_level(o) for o in objs)
        worst = max(per_object[o][symbol] for o in objs)
        if worst > floor:
            users = ", ".join(f"{o.name} ({LEVEL_NAMES[per_object[o][symbol]]})" for o in objs)
            failures.append(f"COMDAT leak risk: {symbol} is defined in {users}; the linker may keep a "
                            f"{LEVEL_NAMES[worst]} copy for {LEVEL_NAMES[floor]} callers")
    print(f"{len(shared)} symbols are defined in more than one object (inline functions, templates)")
    for failure in failures:
        print("FAIL:", failure)
    print("ISA placement:", "FAILED" if failures else "ok (AMX only in its object, AVX512-BF16 only in its objects, AVX-512 only in the "
          "AVX-512 objects, AVX2 only in the AVX2 / AVX-512 objects, no leaking COMDAT copies)")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
