"""User-facing errors: the CLI prints these as one line, without a traceback."""


class PipelineError(Exception):
    """A problem with the user's input or files that they can fix (bad path, mismatched cache, ...)."""


def first_line(exc: BaseException) -> str:
    """One-line message for wrapping library exceptions in a PipelineError (some have empty messages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
