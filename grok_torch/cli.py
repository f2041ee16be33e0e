"""The `grok-torch` command: the one place that names every room's commands.

Commands are loaded by module name when they are asked for (click's lazy sub-command pattern), so this
module imports nothing of convert/ or parity/, `grok-torch --help` imports neither torch nor jax, and a
missing optional dependency takes away only the commands that need it.
"""

from __future__ import annotations

import importlib

import click

from grok_torch.errors import EXIT_CODES_HELP, UserError, as_user_error

# command name -> "module:attribute" of its click command, in the order `--help` lists them.
COMMANDS = {
    "convert": "convert.cli:convert_cmd",
    "inspect": "convert.cli:inspect_cmd",
    "verify": "convert.cli:verify_cmd",
    "export-upstream": "convert.cli:export_upstream_cmd",
    "export-serving": "convert.serving.cli:export_serving_cmd",
    "parity": "parity.cli:parity_cmd",
    "generate": "grok_torch.generate_cli:generate_cmd",
    "plan": "grok_torch.plan_cli:plan_cmd",
    "demo": "parity.demo:demo_cmd",
}


def _unavailable(name: str, err: ImportError) -> click.Command:
    """A stand-in for a command whose module cannot be imported: it says why, and exits 1."""

    @click.command(name, help=f"(unavailable: {err})", context_settings={"ignore_unknown_options": True,
                                                                         "allow_extra_args": True})
    def command() -> None:
        raise UserError(f"grok-torch {name} is unavailable here: {err} (a broken or partial installation: "
                        f"reinstall grok-torch)")

    return command


class LazyGroup(click.Group):
    """Sub-commands imported on first use, by module name."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy_commands, *super().list_commands(ctx)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy_commands:
            return super().get_command(ctx, name)
        module_name, attribute = self.lazy_commands[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            return _unavailable(name, err)
        return getattr(module, attribute)

    def invoke(self, ctx: click.Context):
        """Errors that escape a command's own handling still end as one line (a traceback only with --debug)."""
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (Exception, KeyboardInterrupt) as err:
            raise as_user_error(err) from err


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\n" + EXIT_CODES_HELP)
@click.version_option(package_name="grok-torch")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also GROK_TORCH_DEBUG=1).")
def main(debug: bool) -> None:
    """Grok-1 in PyTorch: convert the official checkpoint, check parity with the JAX reference,
    and run the model."""


if __name__ == "__main__":  # `torchrun --nproc-per-node W -m grok_torch.cli generate ...`
    main()
