"""Incremental detokenization: after every appended token, `Tokenizer.decode` returns exactly what
decoding the whole list returns, while decoding only the new tokens (plus a short window)."""

from __future__ import annotations

import random

from conftest import SMOLLM2_DIR

from cluster.tokenizer import Tokenizer

TEXT = "Héllo wörld! 你好，世界 🙂🚀 naïve café — «quotes» and ﬁ ligatures.\n\tdef f(x): return x**2  # ok"


def _tokenizer() -> Tokenizer:
    assert (SMOLLM2_DIR / "tokenizer.json").is_file(), f"{SMOLLM2_DIR} is missing: `make model` makes it"
    return Tokenizer(SMOLLM2_DIR)


def _streams(tok: Tokenizer) -> list[list[int]]:
    """Real text (multi-byte characters split across tokens), special tokens, and random ids."""
    rng = random.Random(0)
    vocab = tok._tok.vocab_size
    special = list(tok._tok.all_special_ids)
    text_ids = tok.encode(TEXT)
    mixed = text_ids[:20] + special[:2] + text_ids[20:]
    return [text_ids, mixed, [rng.randrange(vocab) for _ in range(300)]]


def test_each_step_equals_the_full_decode() -> None:
    tok = _tokenizer()
    for stream in _streams(tok):
        growing: list[int] = []
        for token in stream:
            growing.append(token)
            assert tok.decode(growing) == tok.decode_all(growing)
        assert tok.decode(growing) == tok.decode_all(stream)  # a repeated call changes nothing


def test_appending_several_tokens_at_once_and_interleaved_streams() -> None:
    tok = _tokenizer()
    a, b = _streams(tok)[0], _streams(tok)[2]
    ga: list[int] = []
    gb: list[int] = []
    for i in range(0, max(len(a), len(b)), 3):
        ga.extend(a[i : i + 3])
        gb.extend(b[i : i + 2])
        assert tok.decode(ga) == tok.decode_all(ga)
        assert tok.decode(gb) == tok.decode_all(gb)


def test_decodes_only_new_tokens() -> None:
    tok = _tokenizer()
    decoded = []
    inner = tok.decode_all
    tok.decode_all = lambda ids: decoded.append(len(ids)) or inner(ids)  # type: ignore[method-assign]
    stream = _streams(tok)[2]
    growing: list[int] = []
    for token in stream:
        growing.append(token)
        tok.decode(growing)
    # A full decode per token would decode n(n+1)/2 = 45150 tokens; incremental: a few per token.
    assert sum(decoded) <= 8 * len(stream), sum(decoded)


def test_forgotten_stream_is_decoded_again_correctly() -> None:
    tok = _tokenizer()
    tok.max_streams = 2
    streams = [list(s) for s in _streams(tok)]
    grown: list[list[int]] = [[] for _ in streams]
    for step in range(40):
        for source, growing in zip(streams, grown):  # three streams through a memory of two
            growing.append(source[step])
            assert tok.decode(growing) == tok.decode_all(growing)
    assert len(tok._streams) <= 2
