"""Generation: KV-cache decoding against full recomputation, batching, stopping, limits, tokenizer, CLI."""

import re
import warnings

import pytest
import torch
from click.testing import CliRunner

import grok_torch
from grok_torch.cli import main
from support.models import PROMPTS, random_model, write_converted
from grok_torch.config import GrokConfig
from grok_torch.generation import GenerationError, PromptTruncatedWarning, generate, left_pad
from grok_torch.model import Grok

from support.paths import TOKENIZER

needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"the Grok-1 tokenizer is not at {TOKENIZER}")


@pytest.fixture(scope="module")
def tiny():
    return random_model(GrokConfig.from_name("tiny", sequence_len=64))


def greedy_by_recomputation(model, prompts, steps, eos):
    """Greedy decoding without a cache: the whole left-padded batch is run again at every step."""
    tokens = left_pad(prompts, model.config.pad_token)
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(steps):
        with torch.no_grad():
            next_tokens = model(tokens)[:, -1].argmax(-1)
        for row, token in enumerate(next_tokens.tolist()):
            if not done[row]:
                if token == eos:
                    done[row] = True
                else:
                    out[row].append(token)
        feed = torch.tensor([model.config.pad_token if d else t for d, t in zip(done, next_tokens.tolist())])
        tokens = torch.cat([tokens, feed[:, None]], dim=1)
    return out


def test_cached_greedy_equals_full_recomputation(tiny):
    result = generate(tiny, PROMPTS, max_new_tokens=12, temperature=0.0, eos_token=-1)
    expected = greedy_by_recomputation(tiny, PROMPTS, 12, eos=-1)
    assert result.tokens == expected
    assert result.finish_reasons == ["length"] * 3
    assert all(len(t) == 12 for t in result.tokens)
    assert all(len(set(t)) >= 4 for t in expected)  # the model's output depends on its context
    # A chunked prefill goes through the cache in pieces: the same tokens.
    chunked = generate(tiny, PROMPTS, max_new_tokens=12, temperature=0.0, eos_token=-1, prefill_chunk=3)
    assert chunked.tokens == expected


def test_cached_greedy_equals_full_recomputation_in_bf16(tiny):
    model = Grok(tiny.config, weights="bf16", dtype="bf16")
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in tiny.state_dict().items()})
    result = generate(model.eval(), PROMPTS, max_new_tokens=12, temperature=0.0, eos_token=-1)
    assert result.tokens == greedy_by_recomputation(model, PROMPTS, 12, eos=-1)


def test_a_row_stops_at_eos_and_the_others_continue(tiny):
    free = generate(tiny, PROMPTS, max_new_tokens=10, temperature=0.0, eos_token=-1).tokens
    eos = free[1][3]  # row 1 produces this at its 4th step
    events = []
    result = generate(tiny, PROMPTS, max_new_tokens=10, temperature=0.0, eos_token=eos,
                      on_token=lambda row, token: events.append(("token", row, token)),
                      on_finish=lambda row, reason: events.append(("finish", row, reason)))
    assert result.tokens[1] == free[1][:free[1].index(eos)]
    assert result.finish_reasons[1] == "eos"
    # Cached greedy with EOS handling is still the recomputed greedy (finished rows feed padding).
    assert result.tokens == greedy_by_recomputation(tiny, PROMPTS, 10, eos)
    for row in range(3):
        assert [e[2] for e in events if e[0] == "token" and e[1] == row] == result.tokens[row]
        assert [e for e in events if e[0] == "finish" and e[1] == row] == [("finish", row, result.finish_reasons[row])]
    # Each row's finish is reported right after its last token, before the others' later tokens.
    finish_1 = events.index(("finish", 1, "eos"))
    assert ("token", 0, result.tokens[0][-1]) in events[finish_1:]
    # Rows are counted as produced: prefill gives every row its first token.
    stats = result.stats
    produced = sum(len(t) for t in result.tokens) + result.finish_reasons.count("eos")
    assert stats.decode_tokens == produced - len(PROMPTS)
    assert stats.prompt_tokens == sum(map(len, PROMPTS)) and stats.padded_prompt_tokens == 3 * 7
    assert stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0


def test_padding_does_not_leak_between_rows(tiny):
    # A prompt alone and left-padded in a batch: RoPE is relative, padding is masked, same greedy tokens.
    alone = generate(tiny, [PROMPTS[1]], max_new_tokens=8, temperature=0.0, eos_token=-1).tokens[0]
    batched = generate(tiny, PROMPTS, max_new_tokens=8, temperature=0.0, eos_token=-1).tokens[1]
    assert alone == batched


def test_sampling_is_deterministic_per_seed(tiny):
    run = lambda seed: generate(tiny, PROMPTS, max_new_tokens=8, temperature=1.0, top_p=0.9,  # noqa: E731
                                seed=seed, eos_token=-1).tokens
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_temperature_zero_is_greedy(tiny):
    result = generate(tiny, [PROMPTS[0]], max_new_tokens=1, temperature=0.0)
    with torch.no_grad():
        assert result.tokens[0] == [int(tiny(torch.tensor([PROMPTS[0]]))[0, -1].argmax())]


def test_too_long_prompts_are_refused_or_truncated(tiny):
    long_prompt = list(range(3, 63))  # 60 tokens; sequence_len is 64
    with pytest.raises(GenerationError, match=r"prompt 1 has 60 tokens; with max_new_tokens=5 the model's "
                                              r"sequence_len=64 allows at most 59"):
        generate(tiny, [[5, 6], long_prompt], max_new_tokens=5)
    with pytest.warns(PromptTruncatedWarning, match="kept its last 59 tokens"):
        result = generate(tiny, [[5, 6], long_prompt], max_new_tokens=5, temperature=0.0, truncate=True)
    assert result.prompts[1] == long_prompt[-59:] and result.prompts[0] == [5, 6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(tiny, [long_prompt[-59:]], max_new_tokens=5, temperature=0.0, eos_token=-1).tokens[0] == \
            generate(tiny, [long_prompt[-59:]], max_new_tokens=5, temperature=0.0, eos_token=-1).tokens[0]
    with pytest.raises(GenerationError, match="leaves no room for a prompt"):
        generate(tiny, [[5]], max_new_tokens=64, truncate=True)
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        generate(tiny, [[]], max_new_tokens=2)
    with pytest.raises(GenerationError, match=r"token id 512 outside the vocabulary \[0, 512\)"):
        generate(tiny, [[3, 512]], max_new_tokens=2)
    with pytest.raises(GenerationError, match="top_p must be in"):
        generate(tiny, [[3]], max_new_tokens=2, top_p=0.0)


# ---- tokenizer ------------------------------------------------------------------------------------

@needs_tokenizer
def test_tokenizer_encodes_without_bos_and_round_trips():
    from grok_torch.tokenizer import Tokenizer

    tok = Tokenizer(TOKENIZER)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (131072, 0, 1, 2)
    text = "The answer to life the universe and everything is of course 42.\n  Ünïcödé ✓ 🙂"
    ids = tok.encode(text)
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.encode("Hello")[0] != tok.bos_id
    assert tok.decode(ids) == text
    tok.check_model_vocab(131072)


@needs_tokenizer
def test_stream_decoder_releases_whole_characters_with_their_spaces():
    from grok_torch.tokenizer import StreamDecoder, Tokenizer

    tok = Tokenizer(TOKENIZER)
    prompt = tok.encode("Say")
    continuation = tok.encode("hello wörld 𓀀 and\nmore")
    assert any(tok._sp.id_to_piece(t).startswith("<0x") for t in continuation)  # the emoji: byte pieces
    decoder = StreamDecoder(tok, prompt)
    pieces = [decoder.push(t) for t in continuation] + [decoder.flush()]
    assert "".join(pieces) == " hello wörld 𓀀 and\nmore" == decoder.text
    assert pieces[0] == " hello"  # the first piece keeps its space (decoding it alone would drop it)
    assert all("\ufffd" not in p for p in pieces)


def test_tokenizer_errors_name_the_path_and_the_numbers(tmp_path):
    from grok_torch.tokenizer import Tokenizer, TokenizerError

    with pytest.raises(TokenizerError, match=re.escape(f"tokenizer {tmp_path / 'nope.model'} does not exist")):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="junk.model is not a readable SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")
    if TOKENIZER.exists():
        with pytest.raises(TokenizerError, match="has 131072 pieces but the model's vocab_size is 512"):
            Tokenizer(TOKENIZER).check_model_vocab(512)


# ---- command line ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny converted directory whose vocabulary is the real tokenizer's."""
    path = tmp_path_factory.mktemp("gen") / "tiny-131k"
    write_converted(path, random_model(GrokConfig.from_name("tiny", vocab_size=131072, sequence_len=48), seed=1))
    return path


SUMMARY = re.compile(r"^prefill: (\d+) tokens in [\d.]+ s \([\d.]+ tokens/s\); "
                     r"decode: (\d+) tokens in [\d.]+ s \([\d.]+ tokens/s\)$")


@needs_tokenizer
def test_cli_streams_the_continuation_and_the_speeds(converted):
    from grok_torch.tokenizer import Tokenizer

    tok = Tokenizer(TOKENIZER)
    prompt = "The answer to life the universe and everything is of course"
    args = ["generate", str(converted), "--tokenizer", str(TOKENIZER), "--prompt", prompt, "--max-new-tokens", "6",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--weights", "fp32", "--dtype", "fp32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # What the API gives for the same model, prompt and settings.
    model = grok_torch.load(converted, weights="fp32", dtype="fp32")
    ids = tok.encode(prompt)
    expected = generate(model, [ids], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=7)
    text, summary = result.output.rsplit("\n", 2)[:2]
    assert text == tok.decode(ids) + tok.decode(ids + expected.tokens[0])[len(tok.decode(ids)):]
    match = SUMMARY.match(summary)
    assert match and int(match[1]) == len(ids)
    assert int(match[2]) == len(expected.tokens[0]) + (expected.finish_reasons[0] == "eos") - 1


@needs_tokenizer
def test_cli_batch_prints_each_row_labelled(converted):
    args = ["generate", str(converted), "--tokenizer", str(TOKENIZER), "--prompt", "Hello there", "--prompt",
            "A much longer prompt than the first one", "--max-new-tokens", "4", "--temperature", "0",
            "--dtype", "fp32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sorted(line[:4] for line in lines[:-1]) == ["[1] ", "[2] "]
    assert any(line.startswith("[1] (length) Hello there") for line in lines)
    assert any(line.startswith("[2] (length) A much longer prompt than the first one") for line in lines)
    assert SUMMARY.match(lines[-1])


@needs_tokenizer
def test_cli_truncates_with_a_warning(converted):
    from grok_torch.tokenizer import Tokenizer

    prompt = " ".join(["word"] * 60)
    assert len(Tokenizer(TOKENIZER).encode(prompt)) == 60
    args = ["generate", str(converted), "--tokenizer", str(TOKENIZER), "--prompt", prompt,
            "--max-new-tokens", "4", "--temperature", "0", "--dtype", "fp32"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1
    assert refused.output.startswith("error: prompt 0 has 60 tokens") and refused.output.count("\n") == 1
    truncated = CliRunner().invoke(main, args + ["--truncate"])
    assert truncated.exit_code == 0, truncated.output
    assert "Warning: prompt 0 has 60 tokens; with max_new_tokens=4 the model's sequence_len=48 allows at most 44: " \
           "kept its last 44 tokens" in truncated.output
    assert SUMMARY.match(truncated.output.splitlines()[-1])


def error_line(args):
    result = CliRunner().invoke(main, ["generate", *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    return result.output


def test_cli_errors_are_one_line(tmp_path, converted, monkeypatch):
    import grok_torch.tokenizer

    out = error_line([str(tmp_path / "missing"), "--prompt", "x"])
    assert "missing: not a directory" in out
    monkeypatch.delenv("GROK_TOKENIZER", raising=False)
    monkeypatch.setattr(grok_torch.tokenizer, "SHARED_TOKENIZER", tmp_path / "no-shared.model")
    out = error_line([str(converted), "--prompt", "x"])  # no --tokenizer, none in the directory or beside
    assert (f"no tokenizer found (looked at the copy in {converted}: {converted / 'tokenizer.model'}; the "
            f"development checkout's shared copy: {tmp_path / 'no-shared.model'})") in out
    assert "--tokenizer FILE" in out and "$GROK_TOKENIZER" in out
    out = error_line([str(converted), "--prompt", "x", "--tokenizer", str(tmp_path / "t.model")])
    assert "t.model does not exist" in out
    (tmp_path / "empty").mkdir()
    if TOKENIZER.exists():
        out = error_line([str(tmp_path / "empty"), "--prompt", "x", "--tokenizer", str(TOKENIZER)])
        assert "config.json is missing" in out
        small = tmp_path / "small-vocab"
        write_converted(small, random_model(GrokConfig.from_name("tiny")))
        out = error_line([str(small), "--prompt", "x", "--tokenizer", str(TOKENIZER)])
        assert "has 131072 pieces but the model's vocab_size is 512" in out


def test_cli_refuses_sampling_options_with_greedy_decoding(converted):
    out = error_line([str(converted), "--prompt", "x", "--temperature", "0", "--top-p", "0.9", "--seed", "3"])
    assert out.strip() == "error: --top-p and --seed do not apply with --temperature 0 (greedy decoding draws nothing)"
    out = error_line([str(converted), "--prompt", "x", "--temperature", "0", "--seed", "3"])
    assert "--seed does not apply with --temperature 0" in out
