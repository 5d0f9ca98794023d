"""Compare the JSON, npz and PNG files of two runs (or two folders of runs), timings excluded: a move of code
must leave every number, and every figure, bit-identical.

    python -m tests.compare_runs BEFORE AFTER

Walks BEFORE for ``*.json``, ``*.npz`` and ``*.png`` files, reads the file of the same relative path under
AFTER, and compares the two exactly (floats by ``==``, NaN equal to NaN; arrays element by element; PNGs byte
by byte), except under keys that measure time or the machine's load (:func:`is_timing`). In strings the two
folders' own paths are replaced by one placeholder (a run records the command that made it). Prints one line
per difference and exits 1 when there is any difference or a missing file (2: wrong arguments).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np

# time, load and the machine: measured, never the same twice
TIMING = re.compile(
    r"(^|_)(s|seconds|time|times|wall|wall_s|cpu_s|elapsed|loadavg|speedup|utilization|flops_per_s|peak)(_|$)"
    r"|s_per_point|s_per_step|_s$|^seconds$|timestamp|created|date|^when$|^finished$|pid|hostname|threadpools|load_"
    # stages.json's digests of the files a stage wrote: PDFs carry their creation date, landscape.html plotly's
    # random element ids and spectrum.json its seconds; the files themselves are compared here
    r"|^contents$"
)
# peft writes target_modules from a set: its order follows Python's per-process string hashing
UNORDERED = {"target_modules"}


def is_timing(key: str) -> bool:
    return bool(TIMING.search(str(key)))


def differences(a, b, where: str = "", ignore_text: tuple[str, ...] = ()) -> list[str]:
    """Every place where ``a`` and ``b`` differ; strings are compared after removing each of ``ignore_text``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: keys {sorted(set(a) ^ set(b))} on one side only"] if set(a) != set(b) else []
        for k in a.keys() & b.keys():
            if k in UNORDERED and isinstance(a[k], list) and isinstance(b[k], list):
                out += differences(sorted(a[k]), sorted(b[k]), f"{where}.{k}", ignore_text)
            elif not is_timing(k):
                out += differences(a[k], b[k], f"{where}.{k}", ignore_text)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]",
                                                                                           ignore_text)]  # fmt: skip
    if isinstance(a, str) and isinstance(b, str):
        for text in ignore_text:
            a, b = a.replace(text, "<run>"), b.replace(text, "<run>")
        return [] if a == b else [f"{where}: {a[:80]!r} != {b[:80]!r}"]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if (type(a) is type(b) and a == b) else [f"{where}: {a!r} != {b!r}"]


def npz_differences(a: Path, b: Path) -> list[str]:
    """Arrays of two npz files that differ (exactly; NaN equal to NaN); timing keys excluded."""
    with np.load(a, allow_pickle=True) as x, np.load(b, allow_pickle=True) as y:
        if set(x.files) != set(y.files):
            return [f": arrays {sorted(set(x.files) ^ set(y.files))} on one side only"]
        out = []
        for k in sorted(x.files):
            u, v = x[k], y[k]
            numeric = u.dtype.kind in "fc" and v.dtype.kind in "fc"
            same = u.shape == v.shape and u.dtype == v.dtype and bool(np.array_equal(u, v, equal_nan=numeric))
            if not same and not is_timing(k):
                out.append(f".{k}: arrays differ")
        return out


def compare(before: Path, after: Path) -> tuple[list[str], int]:
    """(differences, number of files compared) between the JSON, npz and PNG files of two folders."""
    out, n = [], 0
    for file in sorted(before.rglob("*.npz")):
        other = after / file.relative_to(before)
        if not other.is_file():
            out.append(f"{file.relative_to(before)}: missing under {after}")
            continue
        n += 1
        out += [f"{file.relative_to(before)}{d}" for d in npz_differences(file, other)]
    for file in sorted(before.rglob("*.png")):  # matplotlib's PNGs carry no date: the same figure, the same bytes
        other = after / file.relative_to(before)
        n += 1
        if not other.is_file() or other.read_bytes() != file.read_bytes():
            out.append(f"{file.relative_to(before)}: missing or not the same bytes under {after}")
    for file in sorted(before.rglob("*.json")):
        rel = file.relative_to(before)
        other = after / rel
        if not other.is_file():
            out.append(f"{rel}: missing under {after}")
            continue
        n += 1
        out += [f"{rel}{d}" for d in differences(json.loads(file.read_text()), json.loads(other.read_text()), "",
                                                 (str(before), str(after)))]  # fmt: skip
    return out, n


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    found, n = compare(Path(argv[0]), Path(argv[1]))
    for line in found:
        print(line)
    print(f"{n} JSON, npz and PNG files compared, {len(found)} differences (timings excluded)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
