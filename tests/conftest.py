"""Shared fixtures: tiny random Hugging Face models on disk, their greedy reference, and engine checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = REPO / "data" / "models" / "SmolLM2-135M-Instruct"

# Tiny shapes: a multi-head OPT, a multi-head Llama and a grouped-query Llama. std >= 0.2 so that
# logits are far from flat and greedy choices are not decided by rounding.
TINY = {
    "opt": dict(arch="opt", hidden=64, layers=2, heads=4, kv_heads=4, ffn=128),
    "llama": dict(arch="llama", hidden=64, layers=2, heads=4, kv_heads=4, ffn=128),
    "llama-gqa": dict(arch="llama", hidden=64, layers=2, heads=4, kv_heads=2, ffn=128),
}
VOCAB = 256
MAX_POSITIONS = 512


def make_hf_model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    shape = TINY[name]
    torch.manual_seed(1234)
    if shape["arch"] == "opt":
        config = OPTConfig(
            vocab_size=VOCAB, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
            ffn_dim=shape["ffn"], num_attention_heads=shape["heads"], max_position_embeddings=MAX_POSITIONS,
            init_std=0.2, dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        model = OPTForCausalLM(config)
    else:
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
            intermediate_size=shape["ffn"], num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"], max_position_embeddings=MAX_POSITIONS,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    # Norm weights start at exactly 1; perturb them so a mis-loaded norm would show.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(0.1 * torch.randn_like(param))
    model.set_attn_implementation("eager")
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved once per session as safetensors; returns name → directory."""
    dirs = {}
    for name in TINY:
        path = tmp_path_factory.mktemp(name)
        make_hf_model(name).save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="session")
def tiny_opt_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random OPT written by `make-dummy`'s code, with SmolLM2's tokenizer: for text-level tests."""
    from worker import dummy

    path = tmp_path_factory.mktemp("tiny-opt-tokenizer")
    dummy.write_dummy_checkpoint("opt", "125m", path, SMOLLM2_DIR, seed=0, dtype="float32", init_std=0.3,
                                 shape=dummy.Shape(hidden=64, layers=2, heads=4, kv_heads=4, ffn=128))
    return path


@dataclass
class Reference:
    tokens: list[int]
    gaps: list[float]  # top-2 logit gap at each generated position


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new: int) -> Reference:
    """The reference: transformers at batch 1, no padding, argmax taken in float64."""
    ids = list(prompt)
    tokens, gaps = [], []
    past = None
    step_input = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(max_new):
            out = model(step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].double()
            top2 = torch.topk(logits, 2).values
            token = int(logits.argmax())
            tokens.append(token)
            gaps.append(float(top2[0] - top2[1]))
            step_input = torch.tensor([[token]])
    return Reference(tokens, gaps)


TIE_GAP = 1e-4


def assert_matches_reference(got: list[int], ref: Reference, label: str) -> None:
    """Token for token; at the first difference the reference must be a true tie (gap < 1e-4)."""
    for i, (a, b) in enumerate(zip(got, ref.tokens)):
        if a != b:
            assert ref.gaps[i] < TIE_GAP, (
                f"{label}: token {i} is {a}, reference {b} (top-2 gap {ref.gaps[i]:.3g} is not a tie)\n"
                f"got {got}\nref {ref.tokens}"
            )
            return
    assert len(got) == len(ref.tokens), f"{label}: {len(got)} tokens, reference {len(ref.tokens)}"


def assert_cache_empty(engine: object) -> None:
    cache = engine.cache  # type: ignore[attr-defined]
    cache.check_invariants()
    usage = cache.usage()
    assert usage.num_free == usage.num_blocks, f"{usage.num_blocks - usage.num_free} blocks still in use"


@pytest.fixture
def make_llm() -> Iterator[Callable[..., object]]:
    """Builds `LLM`s; after the test, every one of them must have all blocks free."""
    from cluster import LLM

    built: list[LLM] = []

    def factory(model: str | Path, **kwargs: object) -> LLM:
        kwargs.setdefault("dtype", "float32")
        llm = LLM(str(model), **kwargs)  # type: ignore[arg-type]
        built.append(llm)
        return llm

    yield factory
    for llm in built:
        try:
            assert not llm.engine.has_unfinished(), "requests left unfinished"
            assert_cache_empty(llm.engine)
        finally:
            llm.shutdown()
