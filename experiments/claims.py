"""The paper's claims put to the test: a table of each claim, our measurement with its interval, and a verdict.

The claims (the RandLoRA paper, Albert et al. ICLR 2025: its stated findings on the
loss landscape, and its ΔW's rank d = min(out, in) for generic λ, γ):

- FT deepest: full fine-tuning's vertex loss below LoRA's and RandLoRA's;
- LoRA shallowest: LoRA's vertex loss above FT's and RandLoRA's;
- RandLoRA deeper than LoRA at an equal parameter count (the run's budget matching: LoRA's rank is the one
  whose trainable count is closest to RandLoRA's; the table states both counts and their gap);
- RandLoRA's ΔW full rank (from spectrum.json: the numerical rank of each adapted layer's ΔW against the
  layer's full rank min(out, in)).

An ordering claim is measured by the per-seed differences L_A − L_B of the vertex losses in landscape.json
(``solutions[m]["vertex_loss_per_seed"]``, ``--seeds N``), their mean and 95 % t-interval over the seeds
(:func:`landscape.seeds.t_interval`). Its :func:`verdict`: "agrees" when the interval lies on the claimed side of
0, "disagrees" when it lies on the other side, "within noise" when it holds 0 (a claim made of two orderings
agrees when both do, disagrees when either does). The rank claim is read from seed s's spectrum (the only one
the run analyses), with the rank's tolerance, the float32 noise floor s_max·max(out, in)·ε₃₂ of
:func:`landscape.spectrum.metrics.rank_tol`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from landscape.seeds import t_interval

START, END = "<!-- claims:start -->", "<!-- claims:end -->"
AGREES, DISAGREES, NOISE, NO_INTERVAL = "agrees", "disagrees", "within noise", "no interval (one seed)"
NAMES = {"ft": "FT", "lora": "LoRA", "randlora": "RandLoRA"}
# claim, its orderings (A, B) and the claimed sign of L_A − L_B (−1: A deeper)
ORDER_CLAIMS: tuple[tuple[str, tuple[tuple[str, str], ...], int], ...] = (
    ("FT deepest", (("ft", "lora"), ("ft", "randlora")), -1),
    ("LoRA shallowest", (("lora", "ft"), ("lora", "randlora")), 1),
    ("RandLoRA deeper than LoRA at an equal parameter count", (("randlora", "lora"),), -1),
)
RANK_CLAIM = "RandLoRA's ΔW full rank"


def verdict(ci: Sequence[float] | None, direction: int) -> str:
    """The verdict on a claim that a difference has the sign ``direction`` (−1 or +1), from its interval ``ci``:
    "agrees" when the interval excludes 0 on the claimed side, "disagrees" when it excludes 0 on the other side,
    "within noise" when it holds 0; without an interval (one seed) no verdict."""
    if direction not in (-1, 1):
        raise ValueError(f"direction must be -1 or +1, not {direction}")
    if ci is None:
        return NO_INTERVAL
    low, high = (direction * float(v) for v in ci)  # on the claimed side: both above 0
    low, high = min(low, high), max(low, high)
    return AGREES if low > 0 else DISAGREES if high < 0 else NOISE


def combined(verdicts: Sequence[str]) -> str:
    """A claim made of several orderings: disagrees if any does, agrees if all do, else within noise."""
    if DISAGREES in verdicts:
        return DISAGREES
    if NO_INTERVAL in verdicts:
        return NO_INTERVAL
    return AGREES if all(v == AGREES for v in verdicts) else NOISE


def per_seed(meta: Mapping, method: str) -> list[float]:
    """The vertex losses of ``method`` over the run's seeds (seed s's alone with one seed)."""
    sol = meta["solutions"][method]
    return [float(v) for v in (sol.get("vertex_loss_per_seed") or [sol["vertex_loss"]])]


def ordering(meta: Mapping, a: str, b: str, direction: int) -> dict:
    """One ordering of a claim: the per-seed differences L_a − L_b, their mean and interval, and the verdict."""
    diff = [x - y for x, y in zip(per_seed(meta, a), per_seed(meta, b), strict=True)]
    mean, ci = t_interval(diff)
    return {"pair": (a, b), "per_seed": diff, "mean": mean, "ci95": ci, "verdict": verdict(ci, direction)}


def budget(meta: Mapping) -> dict:
    """The budget matching the RandLoRA-vs-LoRA claim rests on: both adapters' parameter counts and their gap."""
    lora, rand = (meta["solutions"][m] for m in ("lora", "randlora"))
    n_lora, n_rand = int(lora["adapter_params"]), int(rand["adapter_params"])
    return {"lora": n_lora, "randlora": n_rand, "lora_rank": lora["rank"], "randlora_rank": rand["rank"],
            "relative_gap": abs(n_lora - n_rand) / n_rand}  # fmt: skip


def rank_claim(spec: Mapping) -> dict:
    """RandLoRA's ΔW rank per adapted layer (seed s's spectrum) against the layer's full rank min(out, in)."""
    layers = spec["layers"]
    ranks = [int(layer["randlora"]["rank"]) for layer in layers]
    full = [min(layer["shape"]) for layer in layers]
    at_full = sum(r == f for r, f in zip(ranks, full, strict=True))
    return {"ranks": ranks, "full": full, "layers": len(layers), "at_full": at_full,
            "verdict": AGREES if at_full == len(layers) else DISAGREES}  # fmt: skip


def claims(meta: Mapping, spec: Mapping) -> list[dict]:
    """Every claim of one task: {"claim", "orderings" (or "rank"), "verdict", ["budget"]}."""
    out = []
    for name, pairs, direction in ORDER_CLAIMS:
        orders = [ordering(meta, a, b, direction) for a, b in pairs]
        row = {"claim": name, "orderings": orders, "verdict": combined([o["verdict"] for o in orders])}
        if pairs == (("randlora", "lora"),):  # the claim at an equal parameter count: the counts it rests on
            row["budget"] = budget(meta)
        out.append(row)
    rank = rank_claim(spec)
    out.append({"claim": RANK_CLAIM, "rank": rank, "verdict": rank["verdict"]})
    return out


def _interval(o: Mapping) -> str:
    a, b = (NAMES[m] for m in o["pair"])
    if o["ci95"] is None:
        return f"L({a}) − L({b}) = {o['mean']:+.4f} (one seed)"
    low, high = o["ci95"]
    return f"L({a}) − L({b}) = {o['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def _span(values: Sequence[int]) -> str:
    return str(min(values)) if min(values) == max(values) else f"{min(values)}–{max(values)}"


def measurement(row: Mapping) -> str:
    """The table cell of one claim's measurement."""
    if "rank" in row:
        r = row["rank"]
        return (
            f"numerical rank {_span(r['ranks'])} of full {_span(r['full'])}; "
            f"{r['at_full']} of {r['layers']} layers at full rank (the first seed's spectrum; tolerance "
            "s_max·max(m, n)·ε₃₂)"
        )
    text = "; ".join(_interval(o) for o in row["orderings"])
    if "budget" in row:
        b = row["budget"]
        text += (
            f" — budget matched: LoRA (r = {b['lora_rank']}) {b['lora']:,} vs RandLoRA (r = {b['randlora_rank']}) "
            f"{b['randlora']:,} adapter parameters ({100 * b['relative_gap']:.1f} % apart, the closest LoRA rank)"
        )
    return text


def table(tasks: Mapping[str, tuple[Mapping, Mapping]], caption: str) -> str:
    """The claims table (markdown) over ``tasks`` {title: (landscape.json, spectrum.json)}, under ``caption``."""
    lines = [caption, "", "| claim | task | our measurement (mean [95 % t-interval over seeds]) | verdict |",
             "|---|---|---|---|"]  # fmt: skip
    for title, (meta, spec) in tasks.items():
        for row in claims(meta, spec):
            lines.append(f"| {row['claim']} | {title} | {measurement(row)} | **{row['verdict']}** |")
    return "\n".join(lines)


def seeds_of(meta: Mapping) -> list[int]:
    """The training seeds of a run (``[seed]`` for a run of one seed)."""
    return list(meta["solutions"]["ft"].get("seeds") or [meta["seed"]])
