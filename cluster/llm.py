"""The public offline API: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from cluster.config import AptServeConfig, load_config, with_overrides
from cluster.engine_builder import build_engine
from hybrid_cache.plan import SamplingParams
from scheduler_service.request import RequestOutput
from scheduler_service.samples import kept_samples
from scheduler_service.stats import EngineStats

# A prompt is text, token ids, or a dict {"prompt": str} / {"prompt_token_ids": [...]} that may add
# "cache_type": "kv" | "hidden" to override the cache mode for that request.
Prompt = str | Sequence[int] | dict[str, Any]


class LLM:
    """An engine in this process. Keyword arguments override the default config (`configs/default.yaml`)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str | None = None,
        block_size: int | None = None,
        num_blocks: int | None = None,
        memory_bytes: int | None = None,
        cache_mode: str | None = None,
        policy: str | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        recompute_chunk_tokens: int | None = None,
        device: str | None = None,
        seed: int | None = None,
        num_threads: int | None = None,
        tensor_parallel_size: int | None = None,
        executor: str | None = None,
        config: AptServeConfig | None = None,
    ) -> None:
        overrides = {
            "cache.num_blocks": num_blocks,
            "model.path": model,
            "model.dtype": dtype,
            "model.device": device,
            "model.seed": seed,
            "model.num_threads": num_threads,
            "cache.block_size": block_size,
            "cache.memory_bytes": memory_bytes,
            "cache.recompute_chunk_tokens": recompute_chunk_tokens,
            "scheduler.cache_mode": cache_mode,
            "scheduler.policy": policy,
            "scheduler.max_num_seqs": max_num_seqs,
            "scheduler.max_num_batched_tokens": max_num_batched_tokens,
            "parallel.tensor_parallel_size": tensor_parallel_size,
            "parallel.executor": executor,
        }
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if config is None:
            # Offline batches queue every prompt at once: the server's waiting bound does not apply.
            overrides["scheduler.max_waiting"] = None
        self.config = with_overrides(config or load_config(), overrides)
        self.engine, self.tokenizer = build_engine(self.config)

    def _token_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer: pass prompts as token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _split(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_type"}
            if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
                raise ValueError(
                    "a prompt dict needs exactly one of 'prompt' / 'prompt_token_ids' (and may add 'cache_type')"
                )
            return self._token_ids(prompt.get("prompt", prompt.get("prompt_token_ids"))), prompt.get("cache_type")
        return self._token_ids(prompt), None

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order.

        Bad input raises ValueError before anything runs; the engine stays usable.
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(params_list)} sampling params")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompt_list, params_list):
                token_ids, cache_type = self._split(prompt)
                ids.append(self.engine.add_request(token_ids, p, cache_type=cache_type))
        except Exception:
            for request_id in ids:
                self.engine.abort(request_id)
            self.engine.step()  # deliver the aborts so nothing stays queued
            raise
        finished: dict[str, RequestOutput] = {}
        sample_finals: dict[str, dict[int, RequestOutput]] = {i: {} for i in ids}
        with tqdm(total=len(ids), disable=not use_tqdm, desc="generate") as bar:
            while len(finished) < len(ids):
                for output in self.engine.step():
                    if output.request_id not in sample_finals:
                        continue
                    if output.finish_reason is not None:  # this sample's last output
                        sample_finals[output.request_id][output.index] = output
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [_with_samples(finished[i], sample_finals[i], p) for i, p in zip(ids, params_list)]

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop the model workers (Ray actors with the ray executor; nothing to do in-process)."""
        self.engine.executor.shutdown()


def _with_samples(last: RequestOutput, finals: dict[int, RequestOutput], params: SamplingParams) -> RequestOutput:
    """A request's result: with `n`/`best_of` > 1, its first kept sample carrying every kept one in
    `samples` (the `n` likeliest when `best_of` > `n`, as over HTTP)."""
    if params.num_samples == 1:
        return last
    kept = kept_samples(finals, params.n)
    return dataclasses.replace(kept[0], finished=True, samples=tuple(kept))
