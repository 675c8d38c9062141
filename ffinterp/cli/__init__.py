"""The ``ffinterp`` command line: thin commands that parse, call the library and print.

Each command lives in its own module below and registers itself on :data:`app`.
Bad input of any kind ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys

import click
import typer

from ffinterp import __version__
from ffinterp.errors import FFInterpError

app = typer.Typer(
    name="ffinterp",
    help="Find and explain attention glitches in flip-flop language models.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class Command(typer.core.TyperCommand):
    """A command whose usage line spells arguments one way in every command: ``CKPT`` when
    required, ``[CKPT]`` when optional (typer's own marks required ones ``{ckpt}``)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ffinterp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Find and explain attention glitches in flip-flop language models."""


def fail(message: str) -> None:
    """Print one line and exit 2: the CLI's answer to bad input."""
    from ffinterp.distributed import PeerError, env_world

    found = env_world()
    if found is not None and found[0] != 0:  # under torchrun every rank sees the same arguments
        raise PeerError(message)  # and rank 0 alone says what is wrong with them
    raise FFInterpError(message)


def at_least(value: float, flag: str, low: int = 1) -> None:
    """Refuse ``value`` below ``low``, in the one wording every command uses for it."""
    if value < low:
        fail(f"{flag} must be >= {low}, got {value}")


def check_out_file(out, flag: str = "--out") -> None:
    """Refuse an output file path that cannot be written (a folder, or below a file) before any
    work is done, so a long run never ends in a traceback at its last step."""
    from pathlib import Path

    if out is None:
        return
    out = Path(out)
    if str(out) in ("", "."):
        fail(f"{flag}: empty path")
    if out.is_dir():
        fail(f"{flag} {out}: is a folder, expected a file name")
    _check_parents(out, flag)


def check_out_dir(out, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be made (empty, a file, or below a file) up front."""
    from pathlib import Path

    out = Path(out)
    if str(out) in ("", "."):
        fail(f"{flag}: empty path; name a folder")
    if out.exists() and not out.is_dir():
        fail(f"{flag} {out}: is a file, expected a folder")
    _check_parents(out, flag)


def _check_parents(out, flag: str) -> None:
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f"{flag} {out}: {parent} is a file, not a folder")
            break


# Command modules register themselves on `app` when imported.
from ffinterp.cli import attention as _attention  # noqa: E402,F401
from ffinterp.cli import estimate as _estimate  # noqa: E402,F401
from ffinterp.cli import eval as _eval  # noqa: E402,F401
from ffinterp.cli import glitches as _glitches  # noqa: E402,F401
from ffinterp.cli import harden as _harden  # noqa: E402,F401
from ffinterp.cli import patch as _patch  # noqa: E402,F401
from ffinterp.cli import pretrained as _pretrained  # noqa: E402,F401
from ffinterp.cli import sample as _sample  # noqa: E402,F401
from ffinterp.cli import train as _train  # noqa: E402,F401


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The click exception class ``name`` from click and from the copy newer typer vendors."""
    found = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        vendored = None
    if vendored is not None and hasattr(vendored, name):
        found.append(getattr(vendored, name))
    return tuple(found)


USAGE_ERRORS = _click_exceptions("UsageError")
CLICK_ERRORS = _click_exceptions("ClickException")
ABORTS = _click_exceptions("Abort")
EXITS = _click_exceptions("Exit")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning every usage or input error into one line and exit 2."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    for k, arg in enumerate(args):
        # No count, length or seed beyond int64 makes sense, and torch or numpy would overflow
        # (or loop for ages) deep inside; refuse it while the flag can still be named.
        if arg.lstrip("-").isdigit() and abs(int(arg)) > 2**63 - 1:
            flag = args[k - 1] if k and args[k - 1].startswith("--") else "argument"
            print(f"ffinterp: error: {flag} {arg}: out of range (at most {2**63 - 1})", file=sys.stderr)
            sys.exit(2)
    try:
        rv = command.main(args=args, prog_name="ffinterp", standalone_mode=False)
    except USAGE_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `ffinterp`: show the help
            print(e.format_message(), file=sys.stderr)
            sys.exit(2)
        where = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) is not None else "ffinterp: "
        print(f"{where}error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except ABORTS:
        print("ffinterp: interrupted", file=sys.stderr)
        sys.exit(130)
    except EXITS as e:
        sys.exit(e.exit_code)
    except CLICK_ERRORS as e:
        print(f"ffinterp: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except FFInterpError as e:
        if not getattr(e, "silent", False):  # a torchrun rank repeating rank 0's error stays quiet
            print(f"ffinterp: error: {e.for_cli()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("ffinterp: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
