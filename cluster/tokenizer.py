"""The model directory's tokenizer, when it has one (token-id-only checkpoints work without)."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    """Encodes prompts and decodes outputs (special tokens skipped) with a Hugging Face tokenizer."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer  # imported here: slow, and unneeded without a tokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

    @staticmethod
    def available(model_dir: str | Path) -> bool:
        return any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens included (how logprobs name tokens, as vLLM does)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])
