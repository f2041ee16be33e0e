"""Click commands of the converter: convert, inspect, verify, export-upstream.

The `grok-torch` group (grok_torch/cli.py) loads this module by name when one of them is run. Errors a
user can cause (a bad checkpoint, an existing destination, a bad option value, a full disk) are shown by
grok_torch.errors: one line `error: ...` on stderr and a documented exit status (EXIT_CODES_HELP).

Config selection (convert, verify): `--config` takes a preset name or a JSON file (upstream field
names; extra keys ignored) or a converted directory. Without it, a `config.json` in SRC (or beside
SRC when SRC is the ckpt-0 directory itself) is used if present, else the `grok-1` preset.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import click

from grok_torch.config import GrokConfig
from grok_torch.converted_dir import WEIGHT_FORMATS, is_converted_dir
from grok_torch.errors import EXIT_MISMATCH, UserError, cli_errors

DEFAULT_CONFIG = "grok-1"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """During a conversion, SIGTERM (kill, a batch system's time limit) cleans up as Ctrl-C does."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, AttributeError):  # not the main thread, or no SIGTERM here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _config_for(src: Path, option: str | None) -> tuple[GrokConfig, str]:
    """The config for the raw checkpoint SRC, and where it came from (for messages)."""
    if option:
        return GrokConfig.resolve(option), f"--config {option}"
    for candidate in (src / "config.json", src.parent / "config.json" if src.name == "ckpt-0" else None):
        if candidate is not None and (candidate.exists() or candidate.is_symlink()):  # from_json refuses non-files
            click.echo(f"using config {candidate}", err=True)
            return GrokConfig.from_json(candidate), str(candidate)
    return GrokConfig.from_name(DEFAULT_CONFIG), f"the {DEFAULT_CONFIG} preset (no config.json in {src})"


@contextlib.contextmanager
def _naming_the_config(origin: str, config: GrokConfig | None):
    """A file count that does not fit the config usually means the wrong config: say which one was used."""
    from convert.upstream.raw_checkpoint import FileCountError

    try:
        yield
    except FileCountError as err:
        used = f"{origin} ({config.num_layers} layers)" if config is not None else "the converted directory's config.json"
        raise FileCountError(f"{err}; the config used was {used}: give the checkpoint's own with --config "
                             f"NAME|JSON") from None


def _size(ctx, param, value):
    from convert.disk.safetensors_writer import parse_size

    try:
        return parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def _weights_option(weights: str, old_dtype: str | None) -> str:
    """--weights, or its deprecated spelling --dtype (kept for one release, with a warning)."""
    if old_dtype is None:
        return weights
    if weights != "int8" and weights != old_dtype:
        raise UserError(f"--dtype {old_dtype} and --weights {weights} disagree: --dtype is the deprecated name of "
                        f"--weights here; give only --weights")
    click.echo("warning: convert --dtype is deprecated and will be removed; use --weights (the stored weight "
               "format; --dtype is the compute dtype in every other command)", err=True)
    return old_dtype


def sharded_output_options(noun: str, dst: str, replaceable: str):
    """The options of a command that writes sharded safetensors as a resumable job (convert.disk.job):
    --max-shard-size, --overwrite, --resume, --no-space-check, --progress; `noun` names the job, `dst` the
    output argument, `replaceable` what --overwrite may replace."""
    options = [
        click.option("--max-shard-size", default="5GB", show_default=True, callback=_size, metavar="SIZE",
                     help="Largest safetensors shard: 5GB, 500MB, 1GiB or plain bytes."),
        click.option("--overwrite", is_flag=True, help=f"Replace {dst} if it is {replaceable}."),
        click.option("--resume", is_flag=True,
                     help=f"Continue an interrupted {noun}: reuse the finished shards in .{dst}.partial after "
                          f"checking their recorded sizes and sha256 (the options must be the same)."),
        click.option("--no-space-check", "space_check", is_flag=True, flag_value=False, default=True,
                     help=f"Skip the up-front check that {dst}'s file system has room for the output (for file "
                          f"systems that report free space wrongly)."),
        click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only on a TTY)."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


_CONFIG_HELP = ("Preset name (grok-1, golden-12l, tiny, ...) or JSON file with upstream field names. "
                "Default: SRC/config.json if present, else grok-1.")


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--config", "config_name", metavar="NAME|JSON", help=_CONFIG_HELP)
@click.option("--weights", type=click.Choice(WEIGHT_FORMATS), default="int8", show_default=True,
              help="Stored weight format. int8: keep int8 weights + bf16 scales bit-exact. bf16: dequantize with "
                   "upstream's rounding, except the MoE down projections, kept int8 + scales (upstream uses their "
                   "exact product, which bf16 cannot hold): as faithful as int8. bf16-plain: everything in bf16 "
                   "(less faithful). fp32: the dequantized values upstream computes with.")
@click.option("--dtype", "old_dtype", type=click.Choice(WEIGHT_FORMATS), default=None, hidden=True,
              help="Deprecated name of --weights (--dtype is the compute dtype in every other command).")
@click.option("--tokenizer", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The release's tokenizer.model, copied into DST (its sha256 recorded) so that generate finds it "
                   "[default: SRC/tokenizer.model or SRC/../tokenizer.model when present].")
@sharded_output_options("conversion", "DST", "a directory grok-torch wrote (its .grok-torch-output marker, "
                        "nothing else in it)")
@cli_errors
def convert_cmd(src: Path, dst: Path, config_name: str | None, weights: str, old_dtype: str | None, max_shard_size: int,
                overwrite: bool, resume: bool, space_check: bool, tokenizer: Path | None, progress: bool | None) -> None:
    """Convert the official Grok-1 checkpoint SRC (a directory holding ckpt-0/, or ckpt-0 itself) into
    DST: sharded safetensors in grok_torch names and layout, plus config.json.

    The whole checkpoint is validated first from pickle metadata (no pickle is ever executed), and the
    free space on DST's file system is checked. The output is built in .DST.partial beside DST and
    renamed to DST only when complete. Interrupted (Ctrl-C, SIGTERM, a crash), the finished shards stay
    there: rerun with --resume to check and reuse them. On an error, or a full disk, the partial output
    is removed. SRC is only ever read.
    """
    from convert.converter import convert_checkpoint

    weights = _weights_option(weights, old_dtype)
    config, origin = _config_for(src, config_name)
    with _sigterm_as_interrupt(), _naming_the_config(origin, config):
        result = convert_checkpoint(src, dst, config, weights=weights, max_shard_size=max_shard_size,
                                    overwrite=overwrite, progress=progress, resume=resume, check_space=space_check,
                                    tokenizer=tokenizer, log=lambda message: click.echo(message, err=True))
    reused = f" ({result.reused_shards} reused after checking)" if result.reused_shards else ""
    click.echo(f"wrote {result.dst}: {result.tensors} tensors ({result.weight_format}), "
               f"{result.total_bytes:,} bytes in {len(result.shards)} shard(s){reused}")


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@cli_errors
def inspect_cmd(path: Path, as_json: bool) -> None:
    """List every tensor of PATH - a raw checkpoint (ckpt-0) or a converted directory - with its kind,
    dtype, shape and bytes, and the totals. Reads metadata only."""
    from convert.inspect import inspect

    report = inspect(path)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.to_text())


@click.command("verify")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path), required=False)
@click.option("--config", "config_name", metavar="NAME|JSON",
              help="Needed only to compare two raw checkpoints (default as for convert); against a converted "
                   "directory its config.json is used and --config, if given, must agree; refused when both "
                   "are converted directories.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only on a TTY).")
@cli_errors
def verify_cmd(src: Path, dst: Path | None, config_name: str | None, progress: bool | None) -> None:
    """Re-read SRC and DST and check every tensor bit for bit: a raw checkpoint against its conversion
    (int8 exact, bf16/fp32 by upstream's dequantization rule), or two raw checkpoints, or two converted
    directories (of different weight formats: linear weights compared by value, as the narrower format
    stores them). A progress bar counts the bytes re-read; the closing line gives the time taken. With SRC alone (a converted directory): check every file against the sha256 that the
    converter recorded in its index. Exit status 3 if anything differs."""
    from convert.verify import verify, verify_recorded

    if dst is None:
        mismatches, checked = verify_recorded(src, progress=progress)
        for line in mismatches:
            click.echo(line)
        if mismatches:
            raise UserError(f"{len(mismatches)} mismatch(es) between {src} and the sha256 recorded at conversion",
                            EXIT_MISMATCH)
        click.echo(f"ok: {src}: {checked} match the sha256 recorded at conversion")
        return
    both_converted = is_converted_dir(src) and is_converted_dir(dst)
    if both_converted and config_name:
        raise UserError("--config does not apply when SRC and DST are both converted directories: each one's "
                        "config.json is used")
    both_raw = not is_converted_dir(src) and not is_converted_dir(dst)
    config, origin = _config_for(src, config_name) if (config_name or both_raw) else (None, "")
    how = "bit for bit"
    if both_converted:
        from convert.verify import converted_formats

        formats = converted_formats(src, dst)
        if formats[0] != formats[1]:
            how = "by value"
            click.echo(f"note: {src} stores {formats[0]} weights and {dst} stores {formats[1]}: linear weights "
                       f"stored in two formats are compared by value, both rendered as the narrower format "
                       f"stores them (int8 dequantized by upstream's rule, fp32 rounded once to bf16); the "
                       f"other tensors bit for bit")
    started = time.monotonic()
    with _naming_the_config(origin, config):
        mismatches = verify(src, dst, config, progress=progress)
    seconds = time.monotonic() - started
    if mismatches:
        for line in mismatches:
            click.echo(line)
        raise UserError(f"{len(mismatches)} mismatch(es) between {src} and {dst}", EXIT_MISMATCH)
    click.echo(f"ok: every tensor of {dst} matches {src} ({how}; {seconds:.1f} s)")


@click.command("export-upstream")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True,
              help="Replace DST if grok-torch wrote it (its .grok-torch-output marker, nothing else in it).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: only on a TTY).")
@cli_errors
def export_upstream_cmd(src: Path, dst: Path, overwrite: bool, progress: bool | None) -> None:
    """Write the converted directory SRC back in the official layout, DST/ckpt-0/tensor00000_000 ...

    int8 weights become upstream's pickled QuantizedWeight8bit (byte-identical to the original files for
    an int8 conversion); bf16/fp32 directories give plain float arrays, which upstream's MoE does not run.
    """
    from convert.upstream.export import export_upstream

    result = export_upstream(src, dst, overwrite=overwrite, progress=progress)
    note = (f"; {result.plain_linear} linear weight(s) written unquantized (upstream's MoE runs only "
            f"quantized experts)" if result.plain_linear else "")
    click.echo(f"wrote {result.dst / 'ckpt-0'}: {result.files} files, {result.quantized} quantized{note}")


COMMANDS = (convert_cmd, inspect_cmd, verify_cmd, export_upstream_cmd)
