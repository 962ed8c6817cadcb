"""Build the CUDA kernels of csrc/cuda into a CPU shared library for the emulator.

The .cu sources are not edited: each is copied into the build directory with three documented
source rewrites, line numbers kept, and compiled by g++ as C++17 against the shim headers of
tests/cuda_emu/include (no CUDA toolkit needed):

1. ``kernel<targs><<<grid, block[, smem[, stream]]>>>(args)``
   becomes ``::cuda_emu::launcher("kernel<targs>", kernel<targs>, grid, block[, smem[, stream]])(args)``
   (the kernel expression must be alone on its line before ``<<<``; anything else is an error);
2. ``extern __shared__ T name[];`` (dynamic shared memory) becomes
   ``T* const name = static_cast<T*>(::cuda_emu::dynamic_shared());``;
3. the body of every function declared with ``__launch_bounds__(X)`` starts with
   ``::cuda_emu::check_launch_bounds(X);``, so a launch with more threads fails as on the GPU;
4. every static ``__shared__ T name[...];`` is followed (same line) by
   ``::cuda_emu::fresh_shared(&name, sizeof(name));``, which fills the variable with garbage when
   the first thread of a block passes its declaration: shared memory starts uninitialized in
   every block, instead of zeroed, or holding the previous block's values.

A leftover ``<<<``/``>>>`` or ``extern __shared__`` after the rewrite is an error, never skipped.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
INCLUDE = HERE / "include"

FLAGS = ["-O1", "-std=c++17", "-ffp-contract=off", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
         "-Wno-unused-function", "-Wno-unused-variable"]
# The sanitizer builds: AddressSanitizer (every file, the runtime included: it announces fiber
# switches to ASan) stands in for compute-sanitizer memcheck; ThreadSanitizer (the kernels and the
# harness only: the runtime tells TSan about fibers and barriers itself and keeps its own
# bookkeeping out of sight) for racecheck.
SANITIZER_FLAGS = {
    None: ([], []),
    "address": (["-fsanitize=address", "-fno-omit-frame-pointer"],) * 2,
    "thread": (["-fsanitize=thread"], ["-DCUDA_EMU_TSAN=1"]),
}


class RewriteError(ValueError):
    """A CUDA construct the rewrite does not understand."""


_LAUNCH = re.compile(r"<<<")
_KERNEL_EXPR = re.compile(r"^\s*((?:::)?[A-Za-z_]\w*(?:::[A-Za-z_]\w*)*(?:<[^;{}]*>)?)\s*$")
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+([A-Za-z_][\w\s:]*?)\s+([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\s*\(")
_STATIC_SHARED = re.compile(r"(?<!\w)__shared__\s+([^;=(){}]+?)\s+([A-Za-z_]\w*)\s*((?:\[[^\];]*\]\s*)*);")


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise RewriteError(f"unbalanced {open_!r} at offset {start}")


def _in_comment(text: str, at: int) -> bool:
    return "//" in text[text.rfind("\n", 0, at) + 1:at]


def _rewrite_launches(text: str, name: str) -> str:
    out, pos = [], 0
    for m in _LAUNCH.finditer(text):
        if m.start() < pos or _in_comment(text, m.start()):
            continue
        line_start = text.rfind("\n", 0, m.start()) + 1
        expr = _KERNEL_EXPR.match(text[line_start:m.start()])
        if expr is None:
            line = text.count("\n", 0, m.start()) + 1
            raise RewriteError(f"{name}:{line}: the kernel before <<< must stand alone on its line: "
                               f"{text[line_start:m.start()]!r}")
        close = text.find(">>>", m.end())
        if close < 0 or ";" in text[m.end():close]:
            raise RewriteError(f"{name}: <<< without its >>>")
        kernel = expr.group(1).strip()
        indent = text[line_start:line_start + expr.start(1)]
        config = text[m.end():close]
        out.append(text[pos:line_start])
        out.append(f'{indent}::cuda_emu::launcher("{kernel}", {kernel}, {config})')
        pos = close + 3
    out.append(text[pos:])
    return "".join(out)


def _rewrite_dynamic_shared(text: str) -> str:
    return _DYNAMIC_SHARED.sub(
        lambda m: f"{m.group(1)}* const {m.group(2)} = static_cast<{m.group(1)}*>(::cuda_emu::dynamic_shared());",
        text)


def _rewrite_static_shared(text: str) -> str:
    def fresh(m):
        if _in_comment(text, m.start()):
            return m.group(0)
        return f"{m.group(0)} ::cuda_emu::fresh_shared(&{m.group(2)}, sizeof({m.group(2)}));"
    return _STATIC_SHARED.sub(fresh, text)


def _rewrite_launch_bounds(text: str, name: str) -> str:
    out, pos = [], 0
    for m in _LAUNCH_BOUNDS.finditer(text):
        if _in_comment(text, m.start()):
            continue
        args_end = _matching(text, m.end() - 1, "(", ")")
        bound = text[m.end():args_end - 1].split(",")[0].strip()
        brace, semicolon = text.find("{", args_end), text.find(";", args_end)
        if brace < 0:
            raise RewriteError(f"{name}: no body after __launch_bounds__({bound})")
        if 0 <= semicolon < brace:  # a declaration; its definition is rewritten where it stands
            continue
        out.append(text[pos:brace + 1])
        out.append(f" ::cuda_emu::check_launch_bounds({bound});")
        pos = brace + 1
    out.append(text[pos:])
    return "".join(out)


def rewrite(text: str, name: str) -> str:
    """The CUDA source ``text`` as C++ for the emulator (see the module docstring)."""
    text = _rewrite_launches(text, name)
    text = _rewrite_dynamic_shared(text)
    text = _rewrite_static_shared(text)
    text = _rewrite_launch_bounds(text, name)
    code = re.sub(r"//[^\n]*", "", text)
    for leftover in ("<<<", ">>>", "extern __shared__"):
        if leftover in code:
            raise RewriteError(f"{name}: {leftover!r} left after the rewrite")
    declared, fresh = len(re.findall(r"(?<!\w)__shared__", code)), code.count("::cuda_emu::fresh_shared(")
    if declared != fresh:
        raise RewriteError(f"{name}: {declared} __shared__ declarations but {fresh} understood by the rewrite")
    return text


def sources(csrc: Path = CSRC) -> list[Path]:
    return sorted((csrc / "cuda").glob("*.cu")) + [HERE / "harness.cpp"]


def _inputs_digest(sanitizer: str | None, compiler: str, csrc: Path) -> str:
    h = hashlib.sha256()
    h.update(" ".join([compiler, *FLAGS, str(sanitizer), str(csrc)]).encode())
    files = sources(csrc) + [HERE / "runtime.cpp", Path(__file__)]
    files += sorted(INCLUDE.glob("*.h")) + sorted((csrc / "cuda").glob("*.h*")) + sorted((csrc / "core").glob("*.h"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def compiler() -> str | None:
    return os.environ.get("CXX_EMU") or shutil.which("g++")


def build(out_dir: Path, sanitizer: str | None = None, jobs: int = 2, csrc: Path = CSRC) -> Path:
    """Compile the rewritten kernels of ``csrc``, the emulator runtime and the harness into one
    shared library under ``out_dir`` (reused when its inputs are unchanged), optionally with a
    sanitizer ("address" or "thread"); returns its path."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("g++ not found")
    unit_flags, runtime_flags = SANITIZER_FLAGS[sanitizer]
    lib = out_dir / f"libcuda_emu_{sanitizer + '_' if sanitizer else ''}{_inputs_digest(sanitizer, cxx, csrc)}.so"
    if lib.exists():
        return lib
    work = out_dir / f"src_{lib.stem}"
    work.mkdir(parents=True, exist_ok=True)
    units = []
    for src in sources(csrc):
        dst = work / (src.stem + ("_cu.cpp" if src.suffix == ".cu" else ".cpp"))
        dst.write_text(f'#line 1 "{src}"\n' + rewrite(src.read_text(), src.name))
        units.append(dst)
    units.append(HERE / "runtime.cpp")
    # nvcc includes cuda_runtime.h into every translation unit; so does this build.
    flags = [*FLAGS, f"-I{csrc}", f"-I{INCLUDE}", "-include", "cuda_runtime.h"]

    def compile_one(unit: Path) -> Path:
        obj = work / (unit.stem + ".o")
        extra = runtime_flags if unit.name == "runtime.cpp" else unit_flags
        proc = subprocess.run([cxx, *flags, *extra, "-c", str(unit), "-o", str(obj)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed on {unit.name}:\n{proc.stderr[-6000:]}")
        return obj

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        objects = list(pool.map(compile_one, units))
    tmp = lib.with_suffix(".tmp")
    proc = subprocess.run([cxx, *flags, *unit_flags, "-shared", "-o", str(tmp), *map(str, objects)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the emulator library failed:\n{proc.stderr[-6000:]}")
    tmp.rename(lib)
    return lib
