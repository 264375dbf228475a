"""One tensor-parallel rank as a long-lived worker: joins its group, loads its shard, runs each step.

Plain Python: `cluster.executor_ray` hosts it in a Ray actor (one per rank); tests can run it in any
process. Every rank receives the same encoded plan each step, over its step channel
(`worker.step_channel`, served on a thread of this process) or through `execute`; rank 0's answer
carries the tokens, and every answer the rank's timings after the step.
"""

from __future__ import annotations

import os

import torch

from hybrid_cache.config import CacheConfig
from hybrid_cache.info import WorkerInfo
from hybrid_cache.plan import CacheType
from hybrid_cache.plan_codec import EncodedPlan, decode_plan, encode_sampled, encode_timings
from worker.config import ModelConfig
from worker.model_runner import ModelRunner
from worker.parallel import destroy_tensor_parallel, init_tensor_parallel
from worker.step_channel import StepServer


class RankWorker:
    def __init__(
        self, model: ModelConfig, cache: CacheConfig, rank: int, tp_size: int, rendezvous_file: str, timeout_s: float
    ) -> None:
        device = torch.device(model.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)  # Ray shows each actor only its own GPU
            model = model.model_copy(update={"device": str(device)})
        self.tp = init_tensor_parallel(rank, tp_size, rendezvous_file, device, timeout_s)
        self.runner = ModelRunner(model, cache, self.tp)
        self.channel: StepServer | None = None

    def info(self) -> WorkerInfo:
        return self.runner.info()

    def execute(self, plan: EncodedPlan) -> list[int]:
        return self.runner.execute(decode_plan(plan)).token_ids

    def answer(self, plan: EncodedPlan) -> EncodedPlan:
        """A step over the step channel: its tokens (and logprobs when asked), and the timings after it."""
        return encode_sampled(self.execute(plan)) | encode_timings(self.runner.timings())

    def open_step_channel(self, host: str, token: str, hello_timeout_s: float) -> tuple[str, int]:
        """Listen on `host` (this rank's node address) for the executor, which must present `token`;
        from then on each plan it sends runs as `answer`. Returns the address to connect to."""
        if self.channel is not None:
            self.channel.close()
        self.channel = StepServer(host, token, self.answer, hello_timeout_s)
        return self.channel.address

    def timings(self) -> dict[str, float]:
        return self.runner.timings()

    def describe(self) -> dict[str, object]:
        """What this rank runs on: for logs and the cluster's statistics."""
        return {
            "rank": self.tp.rank,
            "pid": os.getpid(),
            "threads": self.runner.num_threads,
            "device": str(self.runner.device),
            "num_parameters": sum(p.numel() for p in self.runner.model.parameters()),
            "kv_bytes_per_token_per_layer": self.runner.layout.bytes_per_token_per_layer(CacheType.KV),
            "hidden_bytes_per_token_per_layer": self.runner.layout.bytes_per_token_per_layer(CacheType.HIDDEN),
            "cache_bytes": self.runner.cache.nbytes,
        } | self.runner.describe()

    def shutdown(self) -> None:
        if self.channel is not None:
            self.channel.close()
        destroy_tensor_parallel()
