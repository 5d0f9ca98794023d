"""Benchmark: one CIFAR smoke point with and without the CLIP prompts' shared prefix, side by side.

    python -m experiments.benchmarks.clip_text_prefix [--threads N] [--repeats N]

One evaluated point of the CIFAR-100 smoke (random-init ViT-B/32, 16 images, 100 class prompts, the text tower new
at every point) timed in one process, alternating the whole prompts (:func:`adapters.models.clip.encode_text` with
prefix sharing off) and the shared prefix run once, for the fabricated class names the smoke uses and for CIFAR-100's
real ones; medians of ``--repeats`` after one warm-up. Run it under cifar_smoke's AVX2 environment to time the
slower kind (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from experiments.benchmarks.cifar_smoke import cpu_name

REAL_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail "
    "snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout "
    "tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


def compare(names: list[str], repeats: int) -> dict:
    """Median seconds of one point with the whole prompts and with the shared prefix, and the prefix's length."""
    from adapters.models import clip

    torch.manual_seed(0)
    model = clip.build(len(names), names, pretrained="none").eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    sharable = clip._prefix_sharable
    times: dict[str, list[float]] = {"whole": [], "shared": []}
    try:
        with torch.no_grad():
            for repeat in range(repeats + 1):
                for mode in times:
                    clip._prefix_sharable = sharable if mode == "shared" else (lambda _clip: False)
                    model._text_cache = None
                    start = time.perf_counter()
                    model(pixels=images)
                    if repeat:
                        times[mode].append(time.perf_counter() - start)
    finally:
        clip._prefix_sharable = sharable
    return {"tokens": list(model.prompt_tokens.shape), "prefix": clip.shared_prefix_length(model.prompt_tokens),
            **{f"{mode}_s": statistics.median(t) for mode, t in times.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.clip_text_prefix",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tests.fakes import CIFAR_FINE_NAMES

    print(f"{cpu_name()}, {args.threads} threads; one point = 16 images + 100 prompts, median of {args.repeats}")
    for label, names in (("fabricated names (the smoke's)", list(CIFAR_FINE_NAMES)),
                         ("CIFAR-100's names", [n.replace("_", " ") for n in REAL_NAMES])):  # fmt: skip
        r = compare(names, args.repeats)
        print(
            f"  {label}: prompts {r['tokens']}, shared prefix {r['prefix']} tokens: whole {r['whole_s']:.3f} s, "
            f"shared {r['shared_s']:.3f} s ({r['whole_s'] / r['shared_s']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
