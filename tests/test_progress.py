"""progress.py: the bar every room shares draws on stderr, so stdout keeps only a command's result."""

from __future__ import annotations

from alignkit.progress import progress_bar


def test_progress_bar_draws_on_stderr_and_never_on_stdout(capsys):
    """rich prints a bar's last frame even when the stream is not a terminal (as here): it must land on stderr."""
    with progress_bar(True) as bar:
        task = bar.add_task("score", total=3, status="")
        bar.update(task, advance=3)
    out, err = capsys.readouterr()
    assert out == "" and "score" in err and "3/3" in err


def test_disabled_progress_bar_draws_nothing(capsys):
    with progress_bar(False) as bar:
        task = bar.add_task("score", total=3, status="")
        bar.update(task, advance=3)
    assert capsys.readouterr() == ("", "")
