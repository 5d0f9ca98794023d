"""mkdocs hooks: the CLI reference from the parsers themselves, and the repository's figures/ served to the site.

- ``<!-- cli: MODULE -->`` in a page becomes the ``--help`` of ``python -m MODULE``, produced at build time by
  running the module's own entry point (``runpy``, as ``python -m`` does) with ``--help``: the reference cannot
  drift from the options the parser accepts.
- The figures live at the repository root (``figures/``, where ``experiments.figures`` writes them and the README
  shows them); :func:`on_files` adds them to the site as ``figures/NAME``, so a page links them as
  ``figures/NAME`` from the docs root (``../figures/NAME`` from a subfolder) with nothing copied into ``docs/``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import sys
import warnings
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
CLI = re.compile(r"^<!-- cli: ([\w.]+) -->$", re.M)  # on a line of its own (not one quoted in text)
WIDTH = "110"  # argparse wraps to $COLUMNS: fixed, so the pages do not depend on the terminal that built them


def cli_help(module: str) -> str:
    """The ``--help`` text of ``python -m module``, as its parser prints it."""
    out = io.StringIO()
    argv, columns = sys.argv, os.environ.get("COLUMNS")
    sys.argv, os.environ["COLUMNS"] = [module, "--help"], WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before as a package's
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = argv
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    text = out.getvalue().strip()
    if not text.startswith("usage:"):
        raise RuntimeError(f"python -m {module} --help printed no usage: {text[:200]!r}")
    return text


def on_page_markdown(markdown: str, page, config, files) -> str:
    return CLI.sub(lambda m: f"```text\n{cli_help(m.group(1))}\n```", markdown)


def on_files(files, config):
    for png in sorted((ROOT / "figures").glob("*.png")):
        files.append(File(f"figures/{png.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
