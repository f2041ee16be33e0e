"""Where the tests' assets are: the golden reference (copied into the repo) and the release's tokenizer
(never committed: read from ../shared beside the checkout, or $GROK_TOKENIZER; tests skip without it)."""

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GOLDEN_DIR = ASSETS / "golden-12l"
TOKENIZER = Path(os.environ.get("GROK_TOKENIZER") or
                 Path(__file__).resolve().parents[3] / "shared" / "grok1" / "tokenizer.model")
