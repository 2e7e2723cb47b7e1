"""User-facing errors: one clear line, exit code 2, no traceback; and stops asked for by a signal."""
from __future__ import annotations

import difflib
import signal
from typing import Iterable, List


class UserError(Exception):
    """A mistake in the user's input (recipe, file, value). The CLI prints it as one line and exits 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, outside training."""


SIGNALLED: List[int] = []  # the SIGINT/SIGTERM the command has had (the CLI clears it as it starts and ends)


def stop_on_signal(signum: int, frame: object) -> None:
    """The CLI's SIGINT and SIGTERM handler outside training: the command stops where it is."""
    SIGNALLED.append(signum)
    raise_if_signalled()


def raise_if_signalled() -> None:
    """Stop for a signal the command had, again: its exception is lost where it was raised inside Python code
    that C++ called (torch's FX tracing, as `distill bench` writes a static int8 file), so long loops ask."""
    if SIGNALLED:
        raise Terminated() if SIGNALLED[-1] == signal.SIGTERM else KeyboardInterrupt()


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest option, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
