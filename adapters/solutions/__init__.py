"""Solutions: the :class:`Solution` type and where its weight updates come from, one direction only.

    solution.py     the Solution type, save / load of this tool's folders, fingerprints, the source dispatch
      → foreign.py    readers of solutions trained elsewhere: peft adapter folders of every type, checkpoints
        → deltas.py     ΔW materialisation (Delta, stored / merged / factored updates of this tool's folders)
          → peft_config.py  a peft adapter folder's config (imports nothing of this package)

Each module imports only those below it (checked by import-linter, ``pyproject.toml``). The old paths
``adapters.solution``, ``adapters.foreign`` and ``adapters.deltas`` stay as thin re-exports."""
