"""Errors a user can cause, and how every `grok-torch` command shows them: one line, a documented exit code.

Library code raises ordinary exceptions (a `ValueError` subclass naming the file, tensor or option at
fault; `OutOfSpaceError`; `JobInterrupted` after a clean-up). Commands are wrapped by `cli_errors`, the one
place that turns an exception into `error: <message>` on stderr with its exit code; the traceback is
printed only with `grok-torch --debug` (or GROK_TORCH_DEBUG=1).
"""

from __future__ import annotations

import errno
import functools
import os
import traceback

import click

EXIT_ERROR = 1  # a bad input, destination or option value; also an unexpected internal error
EXIT_USAGE = 2  # click's usage errors: unknown option, missing argument, invalid choice
EXIT_MISMATCH = 3  # verify: the two sides differ
EXIT_NO_SPACE = 4  # not enough free space up front, or the disk filled up while writing
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), or SIGTERM during a conversion
EXIT_CODES_HELP = "\n".join([
    "Exit codes:",
    "  0    success",
    f"  {EXIT_ERROR}    error: bad input, destination or option value, or an internal error",
    "       (one line `error: ...`; grok-torch --debug shows the traceback)",
    f"  {EXIT_USAGE}    usage error (unknown option, missing argument, invalid choice)",
    f"  {EXIT_MISMATCH}    verify found a mismatch",
    f"  {EXIT_NO_SPACE}    not enough disk space (checked up front, or the disk filled up)",
    f"  {EXIT_INTERRUPTED}  interrupted (Ctrl-C; SIGTERM during convert)",
])

# Modules of the optional extras, and what a user installs to get them.
OPTIONAL_MODULES = {name: "the parity extra (pip install 'grok-torch[parity]')" for name in ("jax", "haiku", "matplotlib")}

# Exceptions whose message is written for a user (they name the file, tensor or option at fault).
EXPECTED_ERRORS = (ValueError, KeyError, OSError)


# errno values that mean "no space": bytes or inodes (ENOSPC: the kernel reports both so), or the quota.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def is_no_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS


class OutOfSpaceError(OSError):
    """The destination's file system cannot hold the output: refused up front, or ENOSPC while writing."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a long job, after its clean-up; the message says what was kept."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "interrupted"


class UserError(click.ClickException):
    """Shown as `error: <message>` on stderr, exit status `exit_code` (1 unless given)."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class InterruptedMessage(UserError):
    """Shown as `interrupted...` (the message says what was kept), exit status 130."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_INTERRUPTED)

    def show(self, file=None) -> None:
        click.echo(self.format_message(), err=True)


def debug_enabled() -> bool:
    """`grok-torch --debug ...` or GROK_TORCH_DEBUG=1: show tracebacks with the error line."""
    if os.environ.get("GROK_TORCH_DEBUG", "") not in ("", "0"):
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def as_user_error(err: BaseException) -> UserError:
    """The one CLI rendering of an exception (with the traceback first under --debug)."""
    if debug_enabled():
        traceback.print_exception(err)
    if isinstance(err, JobInterrupted):
        return InterruptedMessage(str(err))
    if isinstance(err, KeyboardInterrupt):
        return InterruptedMessage("interrupted")
    if isinstance(err, OutOfSpaceError):
        return UserError(str(err), EXIT_NO_SPACE)
    if is_no_space(err):  # wherever it happened: still "no space", exit 4
        return UserError(f"out of disk space: {err}", EXIT_NO_SPACE)
    if isinstance(err, ImportError) and (err.name or "").split(".")[0] in OPTIONAL_MODULES:
        module = err.name.split(".")[0]
        return UserError(f"{module} is not installed (or not importable): this needs {OPTIONAL_MODULES[module]}")
    if isinstance(err, EXPECTED_ERRORS):
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        return UserError(message)
    return UserError(f"unexpected {type(err).__name__}: {err}"
                     + ("" if debug_enabled() else " (rerun with --debug for the traceback)"))


_PASS_THROUGH = (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit)


def cli_errors(command):
    """Wrap a click command's function: every exception it lets out becomes `as_user_error(err)`."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except (Exception, KeyboardInterrupt) as err:
            raise as_user_error(err) from err

    return wrapper


def deprecated_alias(old_name: str, old_value, new_name: str, new_value, default):
    """The value of an argument renamed from `old_name` to `new_name`: the old spelling still works for one
    release, with a DeprecationWarning; both at once (with different values) is an error."""
    if old_value is None:
        return new_value
    if new_value != default and new_value != old_value:
        raise ValueError(f"{old_name}={old_value!r} and {new_name}={new_value!r} disagree: {old_name} is the "
                         f"deprecated name of {new_name}; give only {new_name}")
    import warnings

    warnings.warn(f"{old_name}= is deprecated, use {new_name}= (one word per meaning: {new_name} is the stored "
                  f"weight format, dtype the compute dtype)", DeprecationWarning, stacklevel=3)
    return old_value
