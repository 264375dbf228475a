"""Dummy checkpoints: real architectures' names and shapes, seeded, refused when too large."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cluster import LLM, SamplingParams
from worker import dummy


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small word-level tokenizer with SmolLM2-style special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2} | {f"w{i}": i + 3 for i in range(253)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def meta_model(config: dict) -> torch.nn.Module:
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("size", list(dummy.OPT_SHAPES))
def test_shapes_match_transformers(arch: str, size: str) -> None:
    config = dummy.dummy_config(arch, size, vocab_size=49152)
    model = meta_model(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        expected.pop("lm_head.weight")
    assert dummy.tensor_shapes(config) == expected
    assert dummy.estimate_bytes(config, "bfloat16") == 2 * sum(t.numel() for t in model.parameters())


TINY = dummy.Shape(hidden=64, layers=2, heads=4, kv_heads=4, ffn=128)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_tiny_checkpoint_loads_everywhere_and_is_seeded(arch: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    first = dummy.write_dummy_checkpoint(arch, "125m", tmp_path / "a", tokenizer_dir, seed=5, dtype="float32",
                                         init_std=0.3, shape=TINY)
    second = dummy.write_dummy_checkpoint(arch, "125m", tmp_path / "b", tokenizer_dir, seed=5, dtype="float32",
                                          init_std=0.3, shape=TINY)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    config = json.loads((first / "config.json").read_text())
    assert config["vocab_size"] == 256 and config["eos_token_id"] == 2 and config["bos_token_id"] == 1
    hf, info = AutoModelForCausalLM.from_pretrained(first, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # Our engine loads it too, with its tokenizer, and generates the same greedy tokens as transformers.
    llm = LLM(str(first), dtype="float32", block_size=4, num_blocks=64)
    out = llm.generate(["w5 w9 w17"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    ids = torch.tensor([llm.tokenizer.encode("w5 w9 w17")])
    ref = hf.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=2)[0, ids.shape[1]:]
    assert out.token_ids == ref.tolist()


def test_large_sizes_are_refused(tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dummy, "_free_disk", lambda path: 10 << 30)
    with pytest.raises(ValueError, match=r"opt-66b needs 1\d\d\.\d GiB .* free disk space is 10\.0 GiB"):
        dummy.write_dummy_checkpoint("opt", "66b", tmp_path / "big", tokenizer_dir)
    monkeypatch.setattr(dummy, "_free_disk", lambda path: 1 << 50)
    monkeypatch.setattr(dummy, "_total_ram", lambda: 4 << 30)
    with pytest.raises(ValueError, match=r"memory \(RAM\) is 4\.0 GiB"):
        dummy.write_dummy_checkpoint("llama", "6.7b", tmp_path / "big", tokenizer_dir)
    assert not (tmp_path / "big").exists(), "a refused size writes nothing"


def test_unknown_and_post_layernorm_sizes() -> None:
    with pytest.raises(ValueError, match="post-LayerNorm"):
        dummy.dummy_config("opt", "350m", 100)
    with pytest.raises(ValueError, match="unknown size"):
        dummy.dummy_config("llama", "7b", 100)


def test_sharding_keeps_order_and_bound() -> None:
    shapes = {f"t{i}": (1024, 1024) for i in range(10)}
    monkey_limit = dummy.SHARD_BYTES
    try:
        dummy.SHARD_BYTES = 3 * 1024 * 1024 * 4
        shards = dummy.plan_shards(shapes, element_size=4)
    finally:
        dummy.SHARD_BYTES = monkey_limit
    assert [len(s) for s in shards] == [3, 3, 3, 1]
    assert [name for shard in shards for name, _ in shard] == list(shapes)
