"""Grok-1's SentencePiece tokenizer, thinly wrapped: prompts are encoded without BOS, as upstream does.

The tokenizer file (`tokenizer.model` of the release, 131072 pieces, pad 0 / bos 1 / eos 2) is never
bundled with this package. Every command finds it the same way (`find_tokenizer`): `--tokenizer FILE`,
else `$GROK_TOKENIZER`, else the copy `grok-torch convert` made in the converted directory, else the
development checkout's `../shared/grok1/tokenizer.model`.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece

from grok_torch.converted_dir import TOKENIZER_FILE

TOKENIZER_ENV = "GROK_TOKENIZER"
# Where a development checkout keeps the release's tokenizer (never committed to the repository).
SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "grok1" / TOKENIZER_FILE


class TokenizerError(ValueError):
    """A tokenizer that cannot be used: missing or unreadable file, or one that does not fit the model."""


def tokenizer_candidates(given: Path | None = None, directory: Path | None = None) -> list[tuple[Path, str]]:
    """Where to look, in order, each with where it came from. A tokenizer asked for (`--tokenizer`, or
    `$GROK_TOKENIZER`) is the only candidate: a wrong path is an error, not a reason to look elsewhere."""
    if given is not None:
        return [(Path(given), "--tokenizer")]
    if os.environ.get(TOKENIZER_ENV):
        return [(Path(os.environ[TOKENIZER_ENV]), f"${TOKENIZER_ENV}")]
    found = [(Path(directory) / TOKENIZER_FILE, f"the copy in {directory}")] if directory is not None else []
    return found + [(SHARED_TOKENIZER, "the development checkout's shared copy")]


def find_tokenizer(given: Path | None = None, directory: Path | None = None) -> tuple[Path, str]:
    """(path, where it came from) of the tokenizer to use; TokenizerError saying where it looked."""
    candidates = tokenizer_candidates(given, directory)
    if given is not None or os.environ.get(TOKENIZER_ENV):
        return candidates[0]  # asked for: Tokenizer() says if it is missing or unreadable
    for path, source in candidates:
        if path.is_file():
            return path, source
    looked = "; ".join(f"{source}: {path}" for path, source in candidates)
    raise TokenizerError(f"no tokenizer found (looked at {looked}): pass --tokenizer FILE (the release's "
                         f"tokenizer.model) or set ${TOKENIZER_ENV}")


class Tokenizer:
    """SentencePiece tokenizer. `encode` adds no BOS (upstream's runner encodes prompts as they are)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():  # a FIFO or a device would be read forever
            what = ("is a directory, not a tokenizer file" if self.path.is_dir() else
                    "is not a regular file" if self.path.exists() else "does not exist")
            raise TokenizerError(f"tokenizer {self.path} {what}")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"tokenizer {self.path} is not a readable SentencePiece model: {err}") from err

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def piece(self, token_id: int) -> str:
        """The piece of one id: piece(1) is "[BOS]" for Grok-1's tokenizer."""
        return self._sp.id_to_piece(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return list(self._sp.encode(text, add_bos=False, add_eos=False))

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; control tokens (pad, bos, eos) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def check_model_vocab(self, vocab_size: int) -> None:
        """Raise TokenizerError unless this tokenizer has exactly the model's `vocab_size` pieces."""
        if self.vocab_size != vocab_size:
            raise TokenizerError(f"tokenizer {self.path} has {self.vocab_size} pieces but the model's vocab_size "
                                 f"is {vocab_size}: they do not belong together")

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Turns a growing list of generated ids into text increments, for printing as tokens arrive.

    SentencePiece drops the leading space of a text's first piece and byte-fallback pieces only form
    characters together, so decoding one token at a time is wrong. Instead the whole continuation is
    decoded after the prompt's ids, and only new, complete characters are released.
    """

    def __init__(self, tokenizer: Tokenizer, prompt: list[int]):
        self.tokenizer = tokenizer
        self.prompt = list(prompt)
        self.ids: list[int] = []
        self._prompt_text = tokenizer.decode(self.prompt)
        self._emitted = 0

    @property
    def text(self) -> str:
        """The whole continuation decoded so far (after the prompt's text)."""
        return self._text()

    def _text(self) -> str:
        text = self.tokenizer.decode(self.prompt + self.ids)
        if text.startswith(self._prompt_text):
            return text[len(self._prompt_text):]
        return self.tokenizer.decode(self.ids)  # the prompt's text changed at its end: rare, harmless

    def push(self, token: int) -> str:
        """Add a token; return the text that is now complete and was not returned before."""
        self.ids.append(int(token))
        text = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence from byte pieces: wait for the rest
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Whatever is left (also an incomplete character, as the replacement character)."""
        return self._release(self._text())

    def _release(self, text: str) -> str:
        new = text[self._emitted:]
        self._emitted = max(self._emitted, len(text))
        return new
