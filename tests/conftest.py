"""Shared test set-up: runtime shape checking of grok_torch, paths of the test assets."""

from pathlib import Path

import pytest
from jaxtyping import install_import_hook

# The readers of untrusted input check the types of what they read themselves (a config field "64" is a
# ConfigError naming the field, a bad directory a LoadError): they are tested as users run them, without the
# run-time checker, which would refuse such values first with an error of its own.
import grok_torch.config  # noqa: E402,F401
import grok_torch.untrusted_files  # noqa: E402,F401
import grok_torch.converted_dir  # noqa: E402,F401

# Every jaxtyping annotation in grok_torch is checked at run time in the tests (beartype), so the
# shapes written in the forward signatures are enforced, not decoration. Must precede any import
# of the other grok_torch modules.
with install_import_hook("grok_torch", "beartype.beartype"):
    import grok_torch.model  # noqa: F401
    import grok_torch.linear  # noqa: F401
    import grok_torch.sampling  # noqa: F401
    import grok_torch.generation  # noqa: F401
    import grok_torch.loading  # noqa: F401
    import grok_torch.tokenizer  # noqa: F401

from support.paths import GOLDEN_DIR  # noqa: E402


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A writable copy of the golden checkpoint (ckpt-0 + config.json), one per test module."""
    from support.checkpoints import copy_golden_with_config

    return copy_golden_with_config(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def src_sums(src) -> dict[str, str]:
    """sha256 of every file of `src` before any test touches it."""
    from support.checkpoints import sha256_tree

    return sha256_tree(src)
