"""The `grok-torch` command line: convert, inspect, verify, export-upstream, parity, generate, demo."""

from __future__ import annotations

import click

from convert.cli import convert_cmd, export_upstream_cmd, inspect_cmd, verify_cmd
from grok_torch.demo import demo_cmd
from grok_torch.generate_cli import generate_cmd
from parity.cli import parity_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="grok-torch")
def main() -> None:
    """Grok-1 in PyTorch: convert the official checkpoint, check parity with the JAX reference,
    and run the model."""


for command in (convert_cmd, inspect_cmd, verify_cmd, export_upstream_cmd, parity_cmd, generate_cmd, demo_cmd):
    main.add_command(command)
