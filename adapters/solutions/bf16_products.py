"""RandLoRA's factors in bf16, laid out for one fast bf16 ``addmm`` into a bf16 weight.

:meth:`adapters.solutions.deltas.Delta.add_to` with ``bf16=True`` adds an adapter's ΔW to a bf16 weight by one bf16
matmul of its factors (fp32 accumulation, as oneDNN's AMX / AVX512-BF16 kernels and CUDA run it). Why (issue 20
point 4): one factored-plane point builds RandLoRA's full-rank ΔW for every adapted layer, 2·out·in·K multiply-adds
with K ≈ min(in, out), about as many as the forward of a batch; in fp32 that build ran 8× slower than the same
product in bf16 on an AMX CPU, while the forward it feeds ran in bf16.

peft's ``get_scaled_bases`` returns fp32 factors (it upcasts bf16 bases on CPU), one of them ΔW-sized, and in the
transposed layout (``B.T``, ``A.T``) for layers with ``out < in``: casting those per call, and a matmul of transposed
operands, cost as much as the product itself. Here the shared random basis ``randlora_B`` (fixed, regenerated from
the adapter's PRNG key) is rounded to bf16 once, in both layouts a layer can need, and kept while that buffer lives
(:func:`bf16_copy`: the bases the layers use, about two bf16 weights of the largest
adapted shape per distinct number of bases); each layer's small factor λ·A·γ (its trained scales)
is formed in fp32 and rounded once. The products are peft's (same slices, same order of the K index), which the
tests check against ``get_delta_weight``.

Error (U = 2⁻⁸, bf16's unit roundoff): each factor's elements are rounded once, so each product term is off by at
most 2U of itself: |error| ≤ 2U·Σ_k |F_ik·S_kj|, about 2U·|ΔW| for these random-sign terms, plus the one rounding of
the bf16 result that the fp32 product rounded into bf16 has too (tests/test_factored_bf16.py checks the bound).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# id(fp32 basis) -> (weak reference to it, its version, {(layout, bases): bf16 copy}); an entry goes with its basis
_COPIES: dict[int, tuple[weakref.ref, int, dict[tuple[str, int], torch.Tensor]]] = {}


def bf16_copy(basis: torch.Tensor, layout: str, bases: int) -> torch.Tensor:
    """The first ``bases`` bases of ``basis`` (peft's randlora_B, (max_dim, all bases, r)) in bf16, contiguous, made
    once per basis, version, layout and ``bases`` (the layers of one shape share it): ``"rows"`` (max_dim, bases·r)
    as peft's update_B, ``"cols"`` (bases·r, max_dim), its transpose."""
    key = id(basis)
    entry = _COPIES.get(key)
    if entry is None or entry[0]() is not basis or entry[1] != basis._version:
        entry = (weakref.ref(basis, lambda _, k=key: _COPIES.pop(k, None)), basis._version, {})
        _COPIES[key] = entry
    copies = entry[2]
    if (layout, bases) not in copies:
        with torch.no_grad():
            part = basis[:, :bases, :]
            source = part.flatten(1) if layout == "rows" else part.permute(1, 2, 0).flatten(end_dim=1)
            copies[layout, bases] = source.to(torch.bfloat16, memory_format=torch.contiguous_format)
    return copies[layout, bases]


@torch.no_grad()
def randlora_factors(module: nn.Module, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) in bf16 with first @ second · scaling = peft's ``get_delta_weight`` of a RandLoRA ``Linear``
    (out, in), both row-major (the bf16 basis's views, with a leading dimension when sliced)."""
    lam, gam = module.randlora_lambda[adapter].float(), module.randlora_gamma[adapter].float()
    basis_a, basis_b = module.randlora_A[adapter], module.randlora_B[adapter]
    nb, out_f, in_f = module.num_bases, module.out_features, module.in_features
    min_dim, max_dim = min(out_f, in_f), max(out_f, in_f)
    a = basis_a[:, :nb, :min_dim].to(lam.device).float()  # (r, 1 or nb, min_dim): peft's A is one shared base
    if min_dim == in_f:  # peft: update_B (max_dim, K) @ update_A (K, in); update_B = B[:max, :nb, :] over (nb, r)
        first = bf16_copy(basis_b, "rows", nb)[:max_dim]
        # peft's UniqueBaseGrad: λ[:, :, None]·A·γ[None], (r, nb, min_dim), flattened over (r, nb): update_A
        second = (lam[:, :, None] * a * gam[None]).flatten(end_dim=1).to(torch.bfloat16)
        return first, second
    # out < in: peft returns (update_B.T, update_A.T): first = update_A.T (out, K), second = update_B.T (K, in). The
    # same λ·A·γ formed directly as (min_dim, r, nb) from transposed copies of the small A and γ (a permuted copy of
    # the product is 8× slower)
    first = (a.permute(2, 0, 1).contiguous() * lam[None]).mul_(gam.t().contiguous()[:, None, :])
    first = first.reshape(min_dim, -1).to(torch.bfloat16)
    second = bf16_copy(basis_b, "cols", nb)[:, :max_dim]
    return first, second


__all__ = ["bf16_copy", "randlora_factors"]
