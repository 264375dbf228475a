"""Output tokens/s of our engine vs transformers `generate` on the same model and batch.

Default: OPT-125m with dummy weights, batch 16, 128 prompt / 128 output tokens, float32, greedy.
All run in this process, one after another (interleaved repeats, best kept), after a warm-up, with
the same thread count.

    .venv/bin/python -m bench.engine_throughput [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cluster import LLM, SamplingParams

DEFAULT_MODEL = Path("data/models/dummy-opt-125m")
TOKENIZER_DIR = Path("data/models/SmolLM2-135M-Instruct")


def ensure_dummy(path: Path) -> Path:
    """Write the OPT-125m dummy checkpoint once (it needs the converted SmolLM2 tokenizer)."""
    if not (path / "config.json").is_file():
        from worker.dummy import write_dummy_checkpoint

        write_dummy_checkpoint("opt", "125m", path, TOKENIZER_DIR, seed=0)
    return path


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(batch)]


def time_ours(model: Path, prompts: list[list[int]], output_len: int, dtype: str, cache_mode: str) -> float:
    longest = max(len(p) for p in prompts) + output_len
    block_size = 32
    blocks = len(prompts) * (-(-longest // block_size)) + 8
    llm = LLM(str(model), dtype=dtype, block_size=block_size, num_blocks=blocks, cache_mode=cache_mode,
              max_num_seqs=len(prompts))
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == output_len for o in outputs)
    return elapsed


def time_transformers(model: Path, prompts: list[list[int]], output_len: int, dtype: str) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, dtype), local_files_only=True).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kwargs = dict(do_sample=False, min_new_tokens=output_len, max_new_tokens=output_len, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(ids[:2], **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = hf.generate(ids, **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + output_len
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per system; the best is kept")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = ensure_dummy(args.model) if args.model == DEFAULT_MODEL else args.model
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.batch, args.prompt_len, vocab, seed=0)
    systems = {
        "transformers generate": lambda: time_transformers(model, prompts, args.output_len, args.dtype),
        "aptserve kv": lambda: time_ours(model, prompts, args.output_len, args.dtype, "kv"),
        "aptserve hidden": lambda: time_ours(model, prompts, args.output_len, args.dtype, "hidden"),
    }
    results: dict[str, float] = {}
    # Interleaved (A, B, C, A, B, C): slow drift of a shared machine hits every system alike.
    runs = [(name, i) for i in range(args.repeats) for name in systems]
    for name, _ in tqdm(runs, desc="benchmark runs"):
        seconds = systems[name]()
        results[name] = min(results.get(name, float("inf")), seconds)

    tokens = args.batch * args.output_len
    base = tokens / results["transformers generate"]
    print(f"\nmodel {model}, batch {args.batch}, {args.prompt_len} prompt / {args.output_len} output tokens, "
          f"{args.dtype}, {args.threads} threads")
    print(f"{'system':<24}{'output tok/s':>14}{'vs transformers':>18}")
    report = {}
    for name, seconds in results.items():
        rate = tokens / seconds
        report[name] = {"seconds": seconds, "output_tokens_per_s": rate, "ratio_vs_transformers": rate / base}
        print(f"{name:<24}{rate:>14.1f}{rate / base:>17.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"model": str(model), "json": str(args.json)},
                                         "results": report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
