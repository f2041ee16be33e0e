"""The `grok-torch` command line: convert, inspect, verify, export-upstream, parity, generate, demo."""

from __future__ import annotations

import click

from convert.cli import (EXIT_CODES_HELP, as_user_error, convert_cmd, debug_enabled, export_upstream_cmd,
                         inspect_cmd, verify_cmd)
from grok_torch.demo import demo_cmd
from grok_torch.generate_cli import generate_cmd
from parity.cli import parity_cmd


class _Group(click.Group):
    """Errors that escape a command's own handling still end as one line (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (Exception, KeyboardInterrupt) as err:
            user_error = as_user_error(err)
            if not isinstance(err, (ValueError, KeyError, OSError, KeyboardInterrupt)):
                user_error.message = (f"unexpected {type(err).__name__}: {err}"
                                      + ("" if debug_enabled() else " (rerun with --debug for the traceback)"))
            raise user_error from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\n" + EXIT_CODES_HELP)
@click.version_option(package_name="grok-torch")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also GROK_TORCH_DEBUG=1).")
def main(debug: bool) -> None:
    """Grok-1 in PyTorch: convert the official checkpoint, check parity with the JAX reference,
    and run the model."""


for command in (convert_cmd, inspect_cmd, verify_cmd, export_upstream_cmd, parity_cmd, generate_cmd, demo_cmd):
    main.add_command(command)
