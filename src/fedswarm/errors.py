"""Bad input: a file or flag that cannot be used. Commands print it as one line and exit 2."""
from __future__ import annotations


class BadInput(ValueError):
    """A file or flag this process was given cannot be used; the message names it and says what to do."""


def one_line(err: BaseException | str) -> str:
    """An error's text on one line (library messages often span several)."""
    text = str(err).strip() or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def why(err: BaseException) -> str:
    """`Type: text` of a library's exception, on one line (for messages that say what went wrong)."""
    return f"{type(err).__name__}: {one_line(err)}"
