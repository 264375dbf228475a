"""The model directory's tokenizer, when it has one (token-id-only checkpoints work without)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
REPLACEMENT = "\ufffd"  # what a decoder emits for the bytes of a character not yet complete


@dataclass
class _Stream:
    """Where incremental decoding of one growing token list stands."""

    token_ids: list[int]  # the list itself (held, so its id() stays unique while the entry lives)
    text: str = ""  # settled text of tokens[:read]
    prefix: int = 0  # tokens[prefix:read] is the context window decoded again with the new tokens
    read: int = 0


class Tokenizer:
    """Encodes prompts and decodes outputs (special tokens skipped) with a Hugging Face tokenizer.

    `decode` is incremental for the engine's use: a request's `output_token_ids` is one list that only
    grows, decoded after every token. For a list seen before, only its new tokens are decoded, after a
    short window of the tokens before them (so a decoder that treats a word's first piece specially
    sees it in place), and the new text is appended to the settled text: O(new tokens) per call, where
    a full decode is O(length). The result is the full decode's; text that ends in an incomplete
    character is returned but not settled until the character completes. Streams are remembered for the
    `max_streams` most recent lists (an older one is decoded in full again, then continues incrementally).
    """

    def __init__(self, model_dir: str | Path, max_streams: int = 4096) -> None:
        from transformers import AutoTokenizer  # imported here: slow, and unneeded without a tokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self._streams: OrderedDict[int, _Stream] = OrderedDict()
        self.max_streams = max_streams

    @staticmethod
    def available(model_dir: str | Path) -> bool:
        return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode_all(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, decoded in one piece."""
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids` (as `decode_all`), decoding only what was appended since the last call
        with this same list."""
        key = id(token_ids)
        stream = self._streams.get(key)
        if stream is None or stream.token_ids is not token_ids or len(token_ids) < stream.read:
            stream = _Stream(token_ids)
            self._streams[key] = stream
            if len(self._streams) > self.max_streams:
                self._streams.popitem(last=False)
        else:
            self._streams.move_to_end(key)
        end = len(token_ids)
        if end == stream.read:
            return stream.text
        window = self.decode_all(token_ids[stream.prefix : stream.read])
        extended = self.decode_all(token_ids[stream.prefix : end])
        if not extended.startswith(window):
            # The decoder rewrote the window itself (rare normalisations): fall back to a full decode.
            stream.text, stream.prefix, stream.read = self.decode_all(token_ids), end, end
            return stream.text
        new = extended[len(window) :]
        if new.endswith(REPLACEMENT):
            return stream.text + new  # an incomplete character: settle it once its bytes are all here
        stream.text += new
        stream.prefix, stream.read = stream.read, end
        return stream.text

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens included (how logprobs name tokens, as vLLM does)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])
