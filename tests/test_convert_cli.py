"""The click commands: convert, inspect, verify, export-upstream, and their error reporting."""

from __future__ import annotations

import json
import pickle

import click
import pytest
from click.testing import CliRunner

from convert.cli import COMMANDS, convert_cmd, export_upstream_cmd, inspect_cmd, verify_cmd
from support.checkpoints import GOLDEN_DIR, SystemCall, copy_golden

CONFIG = str(GOLDEN_DIR / "config.json")


@click.group()
def cli() -> None:
    """Stand-in for the grok-torch group."""


for _command in COMMANDS:
    cli.add_command(_command)


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


def test_convert_inspect_verify_export_round_trip(tmp_path):
    out, back = tmp_path / "int8", tmp_path / "back"
    result = run("convert", GOLDEN_DIR, out, "--config", CONFIG, "--max-shard-size", "1MB", "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: 230 tensors (int8), 7,353,600 bytes in 8 shard(s)")
    assert json.loads((out / "config.json").read_text())["weight_format"] == "int8"

    result = run("inspect", out)
    assert result.exit_code == 0 and "layers.11.moe.down_proj.scales" in result.stdout and "total: 230" in result.stdout
    report = json.loads(run("inspect", GOLDEN_DIR, "--json").stdout)
    assert report["format"] == "raw checkpoint" and len(report["tensors"]) == 146

    result = run("verify", GOLDEN_DIR, out)
    assert result.exit_code == 0 and result.stdout.startswith("ok: every tensor")

    result = run("export-upstream", out, back)
    assert result.exit_code == 0 and "146 files, 84 quantized" in result.stdout
    result = run("verify", GOLDEN_DIR, back, "--config", CONFIG)
    assert result.exit_code == 0, result.output


def test_config_json_in_src_is_used_by_default(tmp_path):
    result = run("convert", GOLDEN_DIR, tmp_path / "bf16", "--weights", "bf16-plain")
    assert result.exit_code == 0, result.output
    assert f"using config {GOLDEN_DIR / 'config.json'}" in result.stderr
    result = run("export-upstream", tmp_path / "bf16", tmp_path / "back")
    assert result.exit_code == 0 and "84 linear weight(s) written unquantized" in result.stdout


def test_an_export_converts_back_with_its_own_config(tmp_path):
    """export-upstream writes config.json beside ckpt-0, so converting its output back needs no --config."""
    assert run("convert", GOLDEN_DIR, tmp_path / "int8").exit_code == 0
    assert run("export-upstream", tmp_path / "int8", tmp_path / "back").exit_code == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_layers"] == 12
    result = run("convert", tmp_path / "back", tmp_path / "again")
    assert result.exit_code == 0 and f"using config {tmp_path / 'back' / 'config.json'}" in result.stderr
    assert run("verify", GOLDEN_DIR, tmp_path / "again").exit_code == 0


def test_default_config_is_grok1(tmp_path):
    root = copy_golden(tmp_path / "src")  # no config.json beside ckpt-0
    result = run("convert", root, tmp_path / "out")
    assert_user_error(result, "expected exactly 770 files", "(its 146 tensor files fit a 12-layer Grok)",
                      f"the config used was the grok-1 preset (no config.json in {root}) (64 layers): give the "
                      f"checkpoint's own with --config NAME|JSON")
    assert not (tmp_path / "out").exists()
    assert_user_error(run("convert", root, tmp_path / "out", "--config", "tiny"), "the config used was --config tiny")


def test_existing_destination(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert_user_error(run("convert", GOLDEN_DIR, tmp_path / "out"), "already exists; use --overwrite")


def test_malicious_checkpoint_prints_one_error_and_runs_nothing(tmp_path):
    root = copy_golden(tmp_path / "src")
    marker = tmp_path / "MARKER"
    (root / "ckpt-0" / "tensor00003_000").write_bytes(pickle.dumps(SystemCall(f"touch {marker}"), protocol=4))
    result = run("convert", root, tmp_path / "out", "--config", CONFIG)
    assert_user_error(result, "tensor00003_000", "system' is not allowed", "decoder_layer_0/moe/linear_1/w")
    assert len(result.stderr.splitlines()) == 1, result.stderr  # the refusal is one line
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert_user_error(run("inspect", root), "tensor00003_000", "not allowed")


def test_bad_options_are_usage_errors(tmp_path):
    result = run("convert", GOLDEN_DIR, tmp_path / "out", "--max-shard-size", "5 parsecs")
    assert result.exit_code == 2 and "invalid size" in result.output
    result = run("convert", GOLDEN_DIR, tmp_path / "out", "--weights", "int4")
    assert result.exit_code == 2
    assert_user_error(run("convert", GOLDEN_DIR, tmp_path / "out", "--config", "grok-9"), "neither a preset")
    assert_user_error(run("inspect", tmp_path / "nothing"), "no such directory")


def test_convert_dtype_is_the_deprecated_name_of_weights(tmp_path):
    result = run("convert", GOLDEN_DIR, tmp_path / "old", "--config", CONFIG, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert "warning: convert --dtype is deprecated" in result.stderr and "use --weights" in result.stderr
    assert json.loads((tmp_path / "old" / "config.json").read_text())["weight_format"] == "bf16"
    result = run("convert", GOLDEN_DIR, tmp_path / "both", "--config", CONFIG, "--dtype", "bf16", "--weights", "fp32")
    assert_user_error(result, "--dtype bf16 and --weights fp32 disagree")
    assert not (tmp_path / "both").exists()
    assert "--dtype" not in CliRunner().invoke(convert_cmd, ["--help"]).output  # hidden: --weights is the name


def test_convert_checkpoint_dtype_argument_is_deprecated(tmp_path):
    from convert.converter import convert_checkpoint
    from support.checkpoints import golden_config

    with pytest.warns(DeprecationWarning, match="dtype= is deprecated, use weights="):
        result = convert_checkpoint(GOLDEN_DIR, tmp_path / "out", golden_config(), dtype="fp32")
    assert result.weight_format == "fp32"
    with pytest.raises(ValueError, match="disagree"):
        convert_checkpoint(GOLDEN_DIR, tmp_path / "out2", golden_config(), weights="bf16", dtype="fp32")


def _flip_one_byte(directory, name: str) -> None:
    from grok_torch.converted_dir import ConvertedDir
    from support.safetensors_bytes import tensor_byte_range

    target = ConvertedDir(directory).tensors[name]
    offset, _ = tensor_byte_range(target.file, target.name)
    with open(target.file, "r+b") as f:
        f.seek(offset + 7)
        byte = f.read(1)
        f.seek(offset + 7)
        f.write(bytes([byte[0] ^ 0x40]))


def test_verify_two_formats_compares_by_value(tmp_path):
    """An int8, a bf16, a bf16-plain and an fp32 conversion of one checkpoint hold the same weights in four
    formats: verify says so and compares them by value (it reported 28 mismatches for int8 against bf16 before)."""
    for fmt in ("int8", "bf16", "bf16-plain", "fp32"):
        assert run("convert", GOLDEN_DIR, tmp_path / fmt, "--weights", fmt).exit_code == 0
    for a, b in (("int8", "bf16"), ("int8", "fp32"), ("fp32", "bf16"), ("bf16", "int8"), ("int8", "bf16-plain"),
                 ("bf16", "bf16-plain"), ("fp32", "bf16-plain")):
        result = run("verify", tmp_path / a, tmp_path / b)
        assert result.exit_code == 0, result.output
        assert f"stores {a} weights and {tmp_path / b} stores {b}" in result.stdout
        assert "(by value;" in result.stdout and result.stdout.rstrip().endswith(" s)")
    same = run("verify", tmp_path / "bf16", tmp_path / "bf16")
    assert same.exit_code == 0 and "(bit for bit;" in same.stdout and "note:" not in same.stdout


def test_verify_by_value_names_a_changed_weight_exit_3(tmp_path):
    run("convert", GOLDEN_DIR, tmp_path / "int8")
    run("convert", GOLDEN_DIR, tmp_path / "bf16", "--weights", "bf16-plain")
    _flip_one_byte(tmp_path / "bf16", "layers.2.moe.down_proj.weight")
    result = run("verify", tmp_path / "int8", tmp_path / "bf16")
    assert_user_error(result, "1 mismatch(es)", exit_code=3)
    assert ("tensor layers.2.moe.down_proj.weight: 1 of 176128 elements differ by value (int8 + bf16 scales in "
            f"{tmp_path / 'int8'}, bfloat16 in {tmp_path / 'bf16'}, both rendered as bf16)") in result.stdout


def test_verify_two_converted_dirs_refuses_config(tmp_path):
    run("convert", GOLDEN_DIR, tmp_path / "a")
    result = run("verify", tmp_path / "a", tmp_path / "a", "--config", CONFIG)
    assert_user_error(result, "--config does not apply when SRC and DST are both converted directories")


def test_verify_shows_progress_when_asked(tmp_path):
    run("convert", GOLDEN_DIR, tmp_path / "a")
    quiet = run("verify", GOLDEN_DIR, tmp_path / "a")
    assert quiet.exit_code == 0 and "verify:" not in quiet.stderr
    shown = run("verify", GOLDEN_DIR, tmp_path / "a", "--progress")
    assert shown.exit_code == 0 and "verify: 100%" in shown.stderr and "7.01M/7.01M" in shown.stderr


@pytest.mark.parametrize("command, text", [(convert_cmd, "--max-shard-size"), (inspect_cmd, "converted directory"),
                                           (verify_cmd, "bit for bit"), (export_upstream_cmd, "QuantizedWeight8bit")])
def test_help(command, text):
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0 and text in result.output


def test_progress_bar_only_when_asked_in_a_pipe(tmp_path):
    quiet = run("convert", GOLDEN_DIR, tmp_path / "a", "--config", CONFIG)
    assert quiet.exit_code == 0 and "convert (int8)" not in quiet.stderr
    shown = run("convert", GOLDEN_DIR, tmp_path / "b", "--config", CONFIG, "--progress")
    assert shown.exit_code == 0 and "convert (int8): 100%" in shown.stderr and "7.01M/7.01M" in shown.stderr


# ---- the grok-torch group: --debug, unexpected errors, documented exit codes --------------------------------------

def test_debug_shows_the_traceback_and_keeps_the_error_line(tmp_path):
    from grok_torch.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    plain = CliRunner().invoke(main, ["convert", str(GOLDEN_DIR), str(tmp_path / "out")])
    debug = CliRunner().invoke(main, ["--debug", "convert", str(GOLDEN_DIR), str(tmp_path / "out")])
    assert plain.exit_code == debug.exit_code == 1
    assert "Traceback" not in plain.output and len(plain.stderr.splitlines()) == 2  # "using config", "error: ..."
    assert "Traceback (most recent call last)" in debug.stderr and "DestinationError" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1] == (
        f"error: {tmp_path / 'out'} already exists; use --overwrite to replace it")


def test_an_unexpected_error_is_one_line_too(tmp_path, monkeypatch):
    import convert.converter
    from grok_torch.cli import main

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(convert.converter, "convert_checkpoint", broken)
    result = CliRunner().invoke(main, ["convert", str(GOLDEN_DIR), str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == "error: unexpected TypeError: a bug (rerun with --debug for the traceback)"
    result = CliRunner(env={"GROK_TORCH_DEBUG": "1"}).invoke(main, ["convert", str(GOLDEN_DIR), str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_exit_codes_are_documented():
    from grok_torch.errors import EXIT_CODES_HELP
    from grok_torch.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "--debug" in result.output
    for line in EXIT_CODES_HELP.splitlines():
        assert line.strip() in result.output
    readme = (GOLDEN_DIR.parents[2] / "README.md").read_text()
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 130 |"):
        assert code in readme


def test_the_command_line_starts_without_torch():
    """`grok-torch --help`, `convert --help` and the package's non-model names load no torch (about 2 s);
    the model names still import it on first use, and `grok_torch.load` is the function, whatever else was
    imported before."""
    import subprocess
    import sys

    code = """
import sys
from click.testing import CliRunner
import grok_torch, grok_torch.cli
for args in ([], ["convert", "--help"], ["inspect", "--help"]):
    assert CliRunner().invoke(grok_torch.cli.main, args or ["--help"]).exit_code == 0, args
assert "torch" not in sys.modules, "torch was imported"
import grok_torch.loading, grok_torch.generation
assert grok_torch.load is grok_torch.loading.load and grok_torch.generate is grok_torch.generation.generate
from grok_torch import Grok, KVCache, Tokenizer, LoadError, GenerationError, GenerationResult
assert "torch" in sys.modules and Grok.__module__ == "grok_torch.model"
assert set(grok_torch.__all__) <= set(dir(grok_torch))
try:
    grok_torch.no_such_name
except AttributeError as err:
    assert "no_such_name" in str(err)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_config_mismatch_names_only_the_fields_that_differ(tmp_path):
    assert run("convert", GOLDEN_DIR, tmp_path / "int8").exit_code == 0
    values = json.loads((GOLDEN_DIR / "config.json").read_text())
    values["sequence_len"] = 32
    (tmp_path / "other.json").write_text(json.dumps(values))
    result = run("verify", GOLDEN_DIR, tmp_path / "int8", "--config", tmp_path / "other.json")
    assert result.exit_code == 3
    assert (f"{tmp_path / 'int8'}/config.json: grok_config differs from the config given in sequence_len: 32 != 16"
            in result.stdout)
    assert "GrokConfig(" not in result.output
