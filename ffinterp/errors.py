"""The one error type users see: bad input, stated in one line that names what and where."""


class FFInterpError(ValueError):
    """Bad input (a sequence, file, checkpoint or argument). The CLI prints it and exits 2."""
