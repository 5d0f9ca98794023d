"""Benchmarks: every performance figure in the README comes from one of these, measured side by side in one run.

Each is ``python -m experiments.benchmarks.<name>`` with ``--help``; results land in ``results/`` with the CPU
named. Against peers or a plain baseline: ``grid`` (our engine vs the paper's loop and ``loss-landscapes``),
``curvature`` (Lanczos vs PyHessian), ``spectrum`` (vs a naive numpy loop), ``training`` (LoRA, peft's and our
RandLoRA), ``lm_throughput`` (causal-LM scoring vs a plain transformers loop), ``directions`` (random chart vs
the paper's plane). Memory and scale: ``memory`` (factored vs dense plane), ``llm_scale`` (every stage's peak
memory and tokens/s on LLM shapes, with the Llama-3-8B projection), ``factored_cache``, ``cifar_smoke``
(the CIFAR-100 run's stages), ``contention`` (a stage beside a competing process). The baselines live in
``peers.py`` and ``plain_lm.py``; ``grid_cases.py`` and ``grid_engine.py`` are parts of ``grid``.
"""
