"""RandLoRA adapters saved without their random bases: peft regenerates them from the projection key.

peft writes the shared bases once per adapted layer; :func:`save_compact` drops them and records their checksum
(:data:`BASES_FILE`), :func:`verify_bases` checks the regenerated ones after loading.
"""

from __future__ import annotations

from torch import nn

from adapters.methods.randlora import randlora_layers

BASES_FILE = "randlora_bases.json"


def bases_fingerprint(model: nn.Module) -> dict[str, dict]:
    """Per adapter: shapes, projection key and sha256 of the shared bases' fp32 bytes."""
    from adapters.io import digest

    out = {}
    for layer in randlora_layers(model, linear_only=False).values():
        for adapter in layer.randlora_A:
            if adapter in out:
                continue
            bases = [("A", layer.randlora_A[adapter]), ("B", layer.randlora_B[adapter])]
            config = getattr(model, "peft_config", {}).get(adapter)
            out[adapter] = {
                "A_shape": list(layer.randlora_A[adapter].shape),
                "B_shape": list(layer.randlora_B[adapter].shape),
                "projection_prng_key": getattr(config, "projection_prng_key", None),
                "sha256": digest(bases, length=64),
            }
    return out


def save_compact(model: nn.Module, folder, **kwargs) -> None:
    """``save_pretrained`` without the random bases, plus their checksum.

    peft would write the shared bases once per adapted layer (safetensors un-aliases their views: 2.8 GB for
    RandLoRA r = 6 on ViT-B/32, written and read back to drop them, 8 s); here peft is handed the state dict without
    them, and ``save_projection`` is set to false in ``adapter_config.json``, so ``PeftModel.from_pretrained``
    regenerates them from ``projection_prng_key``. :data:`BASES_FILE` records their checksum: call
    :func:`verify_bases` after loading.
    """
    import json
    from pathlib import Path

    folder = Path(folder)
    # state_dict() holds references, no copies; peft selects the adapter's entries from what it is given
    kept = {k: v for k, v in model.state_dict().items() if ".randlora_A" not in k and ".randlora_B" not in k}
    model.save_pretrained(folder, state_dict=kept, **kwargs)
    for weights in folder.rglob("adapter_model.safetensors"):
        config_file = weights.parent / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["save_projection"] = False
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / BASES_FILE).write_text(json.dumps(bases_fingerprint(model), indent=2, sort_keys=True))


def verify_bases(model: nn.Module, folder) -> None:
    """Raise ValueError when ``model``'s regenerated bases differ from those recorded at saving."""
    import json
    from pathlib import Path

    try:
        recorded = json.loads((Path(folder) / BASES_FILE).read_text())
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict):  # damaged: a fingerprint we cannot read verifies nothing
        raise ValueError(f"{BASES_FILE} is damaged (not a JSON object of fingerprints): copy it back from where the "
                         "adapter was saved, or re-save the adapter")  # fmt: skip
    current = bases_fingerprint(model)
    for adapter, want in recorded.items():
        got = current.get(adapter)
        if got != want:
            raise ValueError(
                f"RandLoRA bases of adapter '{adapter}' differ from those it was trained with "
                f"(saved {want}, regenerated {got}): load on the torch/peft versions it was saved with, "
                "or save it with save_pretrained (bases included)"
            )


__all__ = ["BASES_FILE", "bases_fingerprint", "save_compact", "verify_bases"]
