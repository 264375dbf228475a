"""Executes one batch plan on one rank: conversions, the forward pass, sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid_cache.attention import make_backend
from hybrid_cache.config import CacheConfig
from hybrid_cache.info import StepCostModel, WorkerInfo
from hybrid_cache.layout import CacheLayout
from hybrid_cache.plan import BatchPlan
from hybrid_cache.tensors import CacheTensors
from worker.config import ModelConfig
from worker.cost_model import profile_recompute, profile_step_time, step_profile_plans
from worker.cuda_graphs import make_decode_graphs
from worker.loader import load_model
from worker.models import ForwardContext
from worker.openmp import release_openmp_team
from worker.parallel import SINGLE, TensorParallel
from worker.prompt_logprobs import prompt_rows
from worker.sampler import Sampler


@dataclass
class StepResult:
    """Sampled tokens in plan order (with their logprobs where asked: `SampledTokens`); the
    last-position logits when asked for (tests, teacher forcing)."""

    token_ids: list[int]
    logits: torch.Tensor | None = None


class ModelRunner:
    """Owns the model shard, the cache tensors and the sampler of one rank.

    Under tensor parallelism every rank runs every step on the same plan; rank 0 samples. The cache
    layout is the rank's: its share of the K/V heads and of the hidden columns, so the per-rank
    hidden/KV ratio stays `r` and every rank counts the same blocks.
    """

    def __init__(self, model: ModelConfig, cache: CacheConfig, tp: TensorParallel = SINGLE) -> None:
        if model.num_threads:
            torch.set_num_threads(model.num_threads)
        self.num_threads = torch.get_num_threads()
        self.tp = tp
        self.device = torch.device(model.device)
        self.model = load_model(model.path, model.dtype, self.device, tp, model.prepack, model.own_gemm)
        spec = self.model.spec
        self.dtype = next(self.model.parameters()).dtype
        self.layout = CacheLayout(
            num_layers=spec.num_layers,
            hidden_size=spec.hidden_size // tp.size,
            num_kv_heads=spec.num_kv_heads // tp.size,
            head_dim=spec.head_dim,
            block_size=cache.block_size,
            dtype_bytes=torch.empty((), dtype=self.dtype).element_size(),
        )
        self.chunk_tokens = cache.recompute_chunk_tokens
        num_blocks = cache.num_blocks or self.layout.num_blocks_for_budget(cache.memory_bytes or 0, self.chunk_tokens)
        self.cache = CacheTensors(self.layout, num_blocks, self.chunk_tokens, self.dtype, self.device)
        self.sampler = Sampler(self.device, model.seed, spec.eos_token_ids)
        self.backend = make_backend(cache.attention_backend)
        self.graphs = make_decode_graphs(  # None unless CUDA, the triton backend and TP=1 (docs/GPU.md)
            model.cuda_graphs, model.cuda_graph_batch_sizes, self.model, self.cache, self.backend, self.layout,
            self.device, tp.size,
        )
        self.cost = profile_recompute(
            self.model, self.cache.workspace, cache.block_size, cache.profile_token_counts, cache.profile_repeats
        )
        self.step_cost = self._profile_steps(cache.profile_repeats)
        self.cache.workspace.timer.reset()  # the step-time split counts served steps only
        # Servers step on another thread than this one: two OpenMP teams would slow every kernel.
        release_openmp_team()

    def info(self) -> WorkerInfo:
        spec = self.model.spec
        return WorkerInfo(
            vocab_size=spec.vocab_size,
            max_model_len=spec.max_position_embeddings,
            eos_token_ids=spec.eos_token_ids,
            layout=self.layout,
            num_blocks=self.cache.num_blocks,
            cache_bytes=self.cache.nbytes,
            cost=self.cost,
            step_cost=self.step_cost,
        )

    def _profile_steps(self, repeats: int) -> StepCostModel:
        """Whole steps timed on the empty cache (worker/cost_model.py); their sequences are then forgotten."""
        plans = step_profile_plans(self.layout, self.cache.num_blocks, self.model.spec.max_position_embeddings)
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        cost = profile_step_time(self.execute, plans, repeats, synchronize=sync)
        self.execute(BatchPlan([], finished_seq_ids=[s.seq_id for p in plans for s in p.seqs]))
        return cost

    def describe(self) -> dict[str, object]:
        """How this rank computes: its attention backend and the kernels of its GEMMs."""
        return {"attention_backend": self.backend.name, "gemm_kernels": self.model.gemm_kernels()}

    def timings(self) -> dict[str, float]:
        """Cumulative seconds: `model` (whole steps), `attention` (within it), `recompute` (within that)."""
        return dict(self.cache.workspace.timer.totals)

    @torch.inference_mode()
    def execute(self, plan: BatchPlan, return_logits: bool = False) -> StepResult:
        self.sampler.forget(plan.finished_seq_ids)
        self.cache.copy_blocks(plan.block_copies)  # before anything reads or writes them this step
        if not plan.seqs:
            return StepResult([])
        with self.cache.workspace.timer.measure("model"):
            rows = prompt_rows(plan)  # tokens whose logprobs a prompt asked for (`echo` with `logprobs`)
            prompt_hidden = None
            if self.graphs is not None and not rows and self.graphs.accepts(plan):
                last = self.graphs.forward(plan)  # a decode step: its captured graph, replayed
            else:
                meta = self.backend.build_metadata(plan, self.layout, self.chunk_tokens, self.dtype).to(self.device)
                ctx = ForwardContext(meta, self.cache, self.backend)
                self.model.convert_to_kv(ctx)
                ids = [t for s in plan.seqs for t in s.token_ids]
                hidden = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), ctx)
                last = hidden[meta.logits_index]
                prompt_hidden = hidden[rows] if rows else None
            if self.tp.rank != 0:
                return StepResult([])  # the LM head is replicated: rank 0 alone samples
            logits = self.model.compute_logits(last)
            prompt_logits = self.model.compute_logits(prompt_hidden) if prompt_hidden is not None else None
            tokens = self.sampler.sample_step(logits, plan, prompt_logits)
        return StepResult(tokens, logits.float() if return_logits else None)
