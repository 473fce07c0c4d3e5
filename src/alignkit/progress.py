"""What every room may use to report: the progress bar and the logging set-up. Standard library only at import
(rich loads when a bar is made), so anything in alignkit, from `data/` to `cli.py`, can import it without
pulling in a trainer.

Diagnostics go through `logging.getLogger(__name__)` (children of the `alignkit` logger) to stderr; stdout is
kept for a command's output (its JSON result line, generated text, a table the user asked for)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

log = logging.getLogger("alignkit")


def progress_bar(enabled: bool):
    """A rich progress bar (description, bar, done/total, a `status` field, time left) on stderr; draws nothing
    when disabled. On stderr because stdout carries a command's result: rich prints a bar's last frame even when
    the stream is not a terminal, which would put it before the JSON line of `alignkit sft ... > result.json`.

    Use: `with progress_bar(show) as bar: task = bar.add_task("name", total=n, status=""); bar.update(task, advance=k)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not enabled, console=Console(stderr=True),
    )


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it per command)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(verbose: bool) -> None:
    """alignkit's diagnostics go to stderr; without --verbose, transformers/HF hub info logs and progress bars are off."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    for name, value in quiet.items():
        if not verbose:
            os.environ.setdefault(name, value)
        elif os.environ.get(name) == value:  # set by an earlier quiet command in this process
            del os.environ[name]
    if "transformers" in sys.modules or verbose:  # once imported, the libraries no longer read the environment
        import huggingface_hub.utils
        import transformers

        if verbose:
            transformers.logging.set_verbosity_info()
            with warnings.catch_warnings():  # the hub read HF_HUB_DISABLE_PROGRESS_BARS at import; it may refuse
                warnings.simplefilter("ignore")
                transformers.logging.enable_progress_bar()
                huggingface_hub.utils.enable_progress_bars()
        else:
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            huggingface_hub.utils.disable_progress_bars()
