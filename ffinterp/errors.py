"""The error types users see: one line that names what and where."""


class FFInterpError(ValueError):
    """Bad input (a sequence, file, checkpoint or argument). The CLI prints it and exits 2."""


class DeadHookError(FFInterpError):
    """A hook an analysis routine relies on never fired, or what it returned never reached the
    output: the result would have been a silent no-op, so the routine stops instead."""
