"""CUDA graphs for decode steps: the forward pass captured once per batch-size bucket, then replayed.

A decode step of KV requests (one new token each, no hidden request, no conversion) launches the same
kernels every time for a given batch size; only the values in its index tensors change. So each
bucket size (`model.cuda_graph_batch_sizes`) is captured once at start-up over persistent input
buffers, and a step of `n` requests fills the smallest bucket `b >= n`:

- all its integer inputs (token ids, positions, cache slots, block tables, lengths) are written into
  one host staging tensor (pinned) and copied to the device in one transfer — no per-field copies;
- rows `n..b` are padding: token 0 at position 0, no keys (`q_len = kv_len = 0`, so attention writes
  nothing for them) and cache block -1 (the `triton` backend's store skips it), so they touch no cache;
- the graph of bucket `b` is replayed and the first `n` rows of its output are the step's hidden rows.

Everything else (prompts, hidden requests, conversions, batches past the largest bucket) runs eagerly.
Graphs are used on CUDA with the `triton` backend at TP=1 (docs/GPU.md). On CPU the same buffers and
padding run eagerly (`capture=False`): that is how tests check this module without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybrid_cache.attention import AttentionBackend
from hybrid_cache.layout import CacheLayout
from hybrid_cache.metadata import AttentionMetadata, PagedBatch, PagedMetadata
from hybrid_cache.plan import BatchPlan, CacheType
from hybrid_cache.tensors import CacheTensors
from worker.models import CausalLM, ForwardContext

# Rows of the staging tensor, each `max_batch` long, then the block tables `[max_batch, width]`.
FIELDS = ("input_ids", "positions", "write_blocks", "write_offsets", "q_len", "kv_len")
PADDING = {"input_ids": 0, "positions": 0, "write_blocks": -1, "write_offsets": 0, "q_len": 0, "kv_len": 0}


def bucket_for(n: int, sizes: Sequence[int]) -> int | None:
    """The smallest bucket that holds `n` rows, or None when `n` exceeds them all."""
    fitting = [size for size in sizes if size >= n]
    return min(fitting) if fitting else None


class DecodeInputs:
    """The persistent inputs of decode steps: one flat int64 device buffer (fields and block tables as
    views of it) and its host staging twin, so a step costs one host→device copy."""

    def __init__(self, max_batch: int, width: int, block_size: int, device: torch.device) -> None:
        self.max_batch, self.width, self.block_size = max_batch, width, block_size
        size = len(FIELDS) * max_batch + max_batch * width
        pin = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=pin)
        self.device_buffer = torch.zeros(size, dtype=torch.long, device=device)
        self.host_fields = self._views(self.host)
        self.fields = self._views(self.device_buffer)
        self.rows = torch.arange(max_batch, device=device)  # q_start and the rows K/V are stored from
        self._copied: torch.cuda.Event | None = None

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.max_batch
        views = {name: flat[i * b : (i + 1) * b] for i, name in enumerate(FIELDS)}
        views["tables"] = flat[len(FIELDS) * b :].view(b, self.width)
        return views

    def accepts(self, plan: BatchPlan) -> bool:
        """A decode-only KV step that fits the largest bucket and the table width."""
        return 0 < len(plan.seqs) <= self.max_batch and all(
            s.cache_type is CacheType.KV and s.num_new == 1 and s.conversion is None
            and -(-s.context_len // self.block_size) <= self.width
            for s in plan.seqs
        )

    def fill(self, plan: BatchPlan, bucket: int) -> None:
        """Stage `plan` (a step `accepts` took) padded to `bucket` rows, then copy it to the device."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the staging tensor
        n, bs = len(plan.seqs), self.block_size
        host = self.host_fields
        for name in FIELDS:
            host[name][n:bucket].fill_(PADDING[name])
        positions = [s.start_pos for s in plan.seqs]
        host["input_ids"][:n] = torch.tensor([s.token_ids[0] for s in plan.seqs])
        host["positions"][:n] = torch.tensor(positions)
        host["write_blocks"][:n] = torch.tensor([s.block_table[p // bs] for s, p in zip(plan.seqs, positions)])
        host["write_offsets"][:n] = torch.tensor([p % bs for p in positions])
        host["q_len"][:n] = 1
        host["kv_len"][:n] = torch.tensor([p + 1 for p in positions])
        tables = host["tables"]
        tables[n:bucket].zero_()
        used = [s.block_table[: -(-s.context_len // bs)] for s in plan.seqs]
        tables[:n] = torch.tensor([t + [0] * (self.width - len(t)) for t in used])
        if self.device_buffer.device.type == "cuda":
            self.device_buffer.copy_(self.host, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self.device_buffer.copy_(self.host)

    def pad_all(self) -> None:
        """Every row padding (for warm-up and capture: nothing is read from or written to the cache)."""
        for name in FIELDS:
            self.host_fields[name].fill_(PADDING[name])
        self.host_fields["tables"].zero_()
        self.device_buffer.copy_(self.host)

    def metadata(self, bucket: int) -> AttentionMetadata:
        """The step metadata of a `bucket`-row decode step, as views of the persistent buffers."""
        # Imported here: Triton wraps its kernels when first imported, which must wait until the
        # triton backend is chosen (TRITON_INTERPRET is read then).
        from hybrid_cache.attention_triton import TritonMetadata

        f, rows = self.fields, self.rows[:bucket]
        empty = torch.empty(0, dtype=torch.long, device=rows.device)
        kv = PagedBatch(f["tables"][:bucket], rows, f["q_len"][:bucket], f["kv_len"][:bucket])
        return TritonMetadata(
            positions=f["positions"][:bucket], kv_write_tokens=rows, kv_write_blocks=f["write_blocks"][:bucket],
            kv_write_offsets=f["write_offsets"][:bucket], hidden_write_tokens=empty, hidden_write_rows=empty,
            logits_index=rows, paged=PagedMetadata(kv, None, empty, []), max_q_kv=1, max_q_hidden=0,
        )


class DecodeGraphs:
    """Decode steps of a model over persistent buffers: replayed CUDA graphs (`capture=True`, CUDA
    only) or the same buffers run eagerly (`capture=False`)."""

    def __init__(
        self,
        model: CausalLM,
        cache: CacheTensors,
        backend: AttentionBackend,
        layout: CacheLayout,
        sizes: Sequence[int],
        max_context: int,
        device: torch.device,
        capture: bool,
    ) -> None:
        if backend.name != "triton":
            raise ValueError("decode graphs need the triton attention backend (its store skips padding rows)")
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.cache, self.backend = model, cache, backend
        self.sizes = sorted(set(sizes))
        width = min(cache.num_blocks, -(-max_context // layout.block_size))
        self.inputs = DecodeInputs(self.sizes[-1], width, layout.block_size, device)
        self.contexts = {b: ForwardContext(self.inputs.metadata(b), cache, backend) for b in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def accepts(self, plan: BatchPlan) -> bool:
        return self.inputs.accepts(plan)

    def _run(self, bucket: int) -> torch.Tensor:
        return self.model(self.inputs.fields["input_ids"][:bucket], self.contexts[bucket])

    @torch.inference_mode()
    def _capture(self) -> None:
        # Largest first, all in one memory pool: a smaller bucket reuses the larger one's activations.
        self.inputs.pad_all()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bucket in reversed(self.sizes):
                for _ in range(2):  # compiles the Triton kernels and settles the allocator first
                    self._run(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        for bucket in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self._run(bucket)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()

    def forward(self, plan: BatchPlan) -> torch.Tensor:
        """Hidden rows `[n, hidden]` of a decode step that `accepts` took, in plan order."""
        n = len(plan.seqs)
        bucket = bucket_for(n, self.sizes)
        assert bucket is not None, "a step accepts() refused"
        self.inputs.fill(plan, bucket)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:n]
        return self._run(bucket)[:n]


def make_decode_graphs(
    enabled: bool,
    sizes: Sequence[int],
    model: CausalLM,
    cache: CacheTensors,
    backend: AttentionBackend,
    layout: CacheLayout,
    device: torch.device,
    tp_size: int,
) -> DecodeGraphs | None:
    """Captured decode graphs where they apply (enabled, CUDA, the triton backend, TP=1), else None."""
    if not enabled or device.type != "cuda" or backend.name != "triton" or tp_size != 1:
        return None
    return DecodeGraphs(model, cache, backend, layout, sizes, model.spec.max_position_embeddings, device, True)
