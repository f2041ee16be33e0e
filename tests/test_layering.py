"""The house: grok_torch/ is the ground floor, the CLI loads the other rooms by name, --help needs no torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

from grok_torch.cli import COMMANDS, LazyGroup, main

ROOT = Path(__file__).resolve().parents[1]
IMPORT_GRAPH = ROOT / "scripts" / "import-graph"


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, **kwargs)


def test_import_graph_shows_no_arrow_back_up():
    result = _run(str(IMPORT_GRAPH))
    assert result.returncode == 0, result.stderr
    assert "grok_torch/ -> " not in result.stdout and "convert/ -> parity/" not in result.stdout
    assert "parity/ -> convert/" in result.stdout and "convert/ -> grok_torch/" in result.stdout
    assert "layering ok" in result.stdout


def test_import_graph_names_an_import_that_runs_back_up(tmp_path):
    for room in ("grok_torch", "convert", "parity"):
        shutil.copytree(ROOT / room, tmp_path / room)
    model = tmp_path / "grok_torch" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _late():\n    from parity.harness import run_parity\n")
    result = _run(str(IMPORT_GRAPH), "--quiet", "--root", str(tmp_path))
    assert result.returncode == 1
    assert "grok_torch/model.py:" in result.stderr and "imports parity.harness" in result.stderr


def _imported_modules(*cli_args: str) -> set[str]:
    code = "import sys; from grok_torch.cli import main; sys.argv = ['grok-torch', *sys.argv[1:]]; main()"
    result = _run("-X", "importtime", "-c", code, *cli_args)
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_help_imports_neither_torch_nor_jax():
    for args in (["--help"], ["convert", "--help"], ["parity", "--help"], ["generate", "--help"], ["demo", "--help"]):
        modules = _imported_modules(*args)
        assert "click" in modules, args  # the measurement works
        assert not {"torch", "jax", "haiku", "safetensors"} & modules, (args, {"torch", "jax"} & modules)


def test_every_command_is_listed_and_loads():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
        assert isinstance(main.get_command(click.Context(main), name), click.Command)


def test_a_command_whose_module_cannot_load_says_why_and_the_rest_work():
    group = LazyGroup("grok-torch", lazy_commands={"convert": COMMANDS["convert"], "broken": "no_such_room.cli:cmd"})
    runner = CliRunner()
    result = runner.invoke(group, ["broken", "x"])
    assert result.exit_code == 1 and result.output.startswith("error: grok-torch broken is unavailable here")
    assert runner.invoke(group, ["convert", "--help"]).exit_code == 0


def test_without_jax_parity_is_one_error_line_and_convert_still_runs(tmp_path):
    blocked = ("import sys; [sys.modules.__setitem__(m, None) for m in ('jax', 'jaxlib', 'haiku')]; "
               "from grok_torch.cli import main; sys.argv = ['grok-torch', *sys.argv[1:]]; main()")
    result = _run("-c", blocked, "parity", "--config", "tiny-1l", "--seq-len", "8")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "is not installed" in result.stderr and "pip install 'grok-torch[parity]'" in result.stderr
    golden = ROOT / "tests" / "assets" / "golden-12l"
    result = _run("-c", blocked, "convert", str(golden), str(tmp_path / "out"), "--config", str(golden / "config.json"))
    assert result.returncode == 0, result.stderr


def test_no_test_module_imports_another():
    import ast

    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0].startswith(("test_", "conftest", "helpers")) for n in names), path.name
