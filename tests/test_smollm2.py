"""The real default model (SmolLM2-135M-Instruct, converted by `make model`): same greedy tokens as
transformers, and coherent text from the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SMOLLM2_DIR, assert_matches_reference, hf_greedy

from cluster import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Water boils at a temperature of",
]
MAX_NEW = 16


@pytest.fixture(scope="module")
def converted() -> str:
    assert (SMOLLM2_DIR / "model.safetensors").is_file(), f"{SMOLLM2_DIR} is missing: `make model` makes it"
    return str(SMOLLM2_DIR)


def test_greedy_matches_transformers_in_kv_mode(converted: str, make_llm) -> None:
    from transformers import AutoModelForCausalLM

    llm = make_llm(converted, dtype="float32", block_size=32, num_blocks=64, cache_mode="kv")
    stats = llm.stats()
    assert stats.ratio == pytest.approx(1.5) and stats.cache_mode == "kv"  # GQA: hidden cache stays off
    hf = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, local_files_only=True,
                                              attn_implementation="eager").eval()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        ref = hf_greedy(hf, llm.tokenizer.encode(prompt), MAX_NEW)
        assert_matches_reference(out.token_ids, ref, prompt)
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_cli_generate_prints_coherent_text(converted: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "The capital of France is", "--max-tokens", "8"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True,
    )
    assert result.stdout.startswith("The capital of France is")
    assert "Paris" in result.stdout
