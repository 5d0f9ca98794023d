"""``--curvature``'s probes spread over a launcher's array: where each probe task keeps its part, and the join.

An entry of curvature.json (a solution in some coordinates) is cut into array tasks (:func:`plan.curvature_tasks`):
one computes its top eigenvalues (Lanczos is sequential: one task), writing the entry without its probes
(``.curvature/S-C/curvature.json``, ``"probes_apart": true``); each of the others builds the entry's operator once
and computes its parts (:func:`plan.probe_parts`), each a range of the Hutchinson trace or SLQ density probes
(:func:`landscape.curvature.trace_probes` / :func:`~landscape.curvature.density_probes`), into
``.curvature/S-C/<kind>-<start>-<stop>.json`` under the entry's key (:func:`landscape.curvature.entry_key`). A part
already there under the same key is kept (the task is idempotent, and resumes after its last written part).
:func:`join` combines the parts, probe for probe, into the entry a one-process run computes
(:func:`~landscape.curvature.combine_trace`, :func:`~landscape.curvature.combine_density`): the same samples,
nodes and weights, so the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from adapters.io import write_json
from landscape.launch.plan import probe_kinds


def part_path(folder: Path, kind: str, start: int, stop: int) -> Path:
    """The file of the ``kind`` (trace or density) probes ``start`` .. ``stop - 1`` of the entry in ``folder``."""
    return Path(folder) / f"{kind}-{start}-{stop}.json"


def read_part(path: Path, key: str) -> dict | None:
    """The part stored at ``path`` under the entry key ``key``; None when absent, unreadable or of another key."""
    try:
        part = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return part if isinstance(part, dict) and part.get("key") == key else None


def write_part(path: Path, key: str, part: Mapping) -> None:
    """A probe task's part, written atomically under the entry key."""
    write_json(path, {"key": key, **part})


def join(entry: Mapping, folder: Path, settings) -> dict | None:
    """The eigenvalue task's ``entry`` (``probes_apart``) with the probe parts in ``folder`` combined into it:
    the entry a one-process run writes (its ``hvps``, ``seconds`` and ``cpu_seconds`` summed over the tasks;
    ``probe_tasks``: the ranges each kind was split into). None when a part of the curvature ``settings``' ranges
    is missing or of another key: the finish job then computes the entry itself."""
    from landscape.curvature import combine_density, combine_trace

    parts = {}
    for kind, ranges in probe_kinds(settings):
        found = [read_part(part_path(folder, kind, a, b), entry["key"]) for a, b in ranges]
        if any(p is None for p in found):
            return None
        parts[kind] = found
    joined = {k: v for k, v in entry.items() if k != "probes_apart"}
    if parts["trace"]:
        joined["hutchinson"] = combine_trace(parts["trace"])
        joined["trace"], joined["trace_se"] = joined["hutchinson"]["trace"], joined["hutchinson"]["trace_se"]
    if parts["density"]:
        joined["density"] = combine_density(parts["density"], settings.density_points, settings.broadening)
    every = [p for found in parts.values() for p in found]
    joined["hvps"] = entry["hvps"] + sum(p["hvps"] for p in every)
    for time in ("seconds", "cpu_seconds"):
        joined[time] = round(entry[time] + sum(p.get(time, 0.0) for p in every), 3)
    joined["probe_tasks"] = {kind: [[p["start"], p["stop"]] for p in found] for kind, found in parts.items()}
    return joined


__all__ = ["join", "part_path", "read_part", "write_part"]
