"""Small things a newcomer meets: progress in a log, and --out pointing at a file."""

from __future__ import annotations

import io
import time

from adapters.progress import LOG_INTERVAL_S, progress_bar
from landscape import connectivity


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_whole_lines_without_carriage_returns():
    log = _Log()
    bar = progress_bar(total=1000, desc="grid", file=log, leave=False)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # at most one redraw per LOG_INTERVAL_S seconds: the first and the final state here, not one per update
    assert 1 <= len(lines) <= 3, lines
    assert "1000/1000" in lines[-1]
    assert all(line.startswith("grid") for line in lines)


def test_progress_on_a_terminal_is_tqdm_as_usual():
    term = _Terminal()
    bar = progress_bar(total=3, desc="grid", file=term, mininterval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in term.getvalue()  # a live bar, redrawn in place
    assert LOG_INTERVAL_S >= 10


def test_out_pointing_at_a_file_exits_2_before_any_work(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    for out in (existing, existing / "run"):
        start = time.perf_counter()
        code = connectivity.main(["--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and "not a folder" in err[0] and "--out" in err[0], err
        assert time.perf_counter() - start < 5  # refused by the configuration, before loading or training
    assert existing.read_text() == "keep me"
