"""User-facing errors: the CLI prints these as one line, without a traceback."""


class PipelineError(Exception):
    """A problem with the user's input or files that they can fix (bad path, mismatched cache, ...)."""
