"""The error types users see: one line that names what and where."""

from __future__ import annotations


class FFInterpError(ValueError):
    """Bad input (a sequence, file, checkpoint or argument). The CLI prints it and exits 2.

    The message names Python arguments (``resume=True``, ``out=``), as a library caller
    passes them. ``flags`` maps each such spelling to the command-line flag that sets it
    (``{"resume=True": "--resume"}``), so the CLI can say ``--resume`` instead (:meth:`for_cli`).
    """

    def __init__(self, message: str = "", *, flags: dict[str, str] | None = None):
        super().__init__(message)
        self.flags = dict(flags or {})

    def for_cli(self) -> str:
        """The message with every Python spelling in ``flags`` replaced by its flag."""
        text = str(self)
        for python, flag in self.flags.items():
            text = text.replace(python, flag)
        return text


class DeadHookError(FFInterpError):
    """A hook an analysis routine relies on never fired, or what it returned never reached the
    output: the result would have been a silent no-op, so the routine stops instead."""
