"""The devices and model shapes a simulation can be sized for, in one table each, with their sources.

A *profile* names a device and a model: `a100-80g/opt-13b`. Device figures are the vendor's dense
(no sparsity) 16-bit tensor-core peak, HBM bandwidth and capacity for the SXM parts; model shapes are
the published configurations. Nothing here is fitted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """One accelerator: what the roofline step-time model and the capacity estimate need."""

    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: int
    interconnect_bytes_per_s: float  # NVLink, per GPU, both directions together
    vidur_family: str | None  # which measured Vidur tables (per-operation, all-reduce) describe it
    source: str


GB = 10**9
DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("a100-40g", 312e12, 1555 * GB, 40 * 2**30, 600 * GB, "a100",
               "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB: 312 TFLOPS BF16 dense, 1,555 GB/s HBM2)"),
        Device("a100-80g", 312e12, 2039 * GB, 80 * 2**30, 600 * GB, "a100",
               "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB: 312 TFLOPS BF16 dense, 2,039 GB/s HBM2e)"),
        Device("h100-80g", 989e12, 3350 * GB, 80 * 2**30, 900 * GB, "h100",
               "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOPS BF16 dense, 3.35 TB/s HBM3)"),
        Device("h200", 989e12, 4800 * GB, 141 * GB, 900 * GB, "h100",
               "NVIDIA H200 Tensor Core GPU datasheet (SXM: 989 TFLOPS BF16 dense, 4.8 TB/s HBM3e, 141 GB); "
               "same compute and NVLink as H100, so Vidur's H100 tables stand in for its operations"),
    )
}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape. `gated_mlp`: Llama's three MLP matrices instead of OPT's two."""

    name: str
    hf_name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_size: int
    vocab_size: int
    max_model_len: int
    gated_mlp: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        """Weights of the attention and MLP matrices plus the embedding (norms and biases are negligible)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * h * 2 + 2 * h * kv  # Q and O, K and V
        mlp = (3 if self.gated_mlp else 2) * h * self.ffn_size
        return self.num_layers * (attention + mlp) + self.vocab_size * h

    def kv_bytes_per_token(self, tp: int, dtype_bytes: int = 2) -> int:
        """K and V of one token over all layers, on one of `tp` ranks."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes // tp


# Published configurations: facebook/opt-* config.json (OPT paper, table 1), meta-llama/Llama-2-7b-hf config.json.
MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("opt-125m", "facebook/opt-125m", 12, 768, 12, 12, 3072, 50272, 2048, False),
        ModelShape("opt-13b", "facebook/opt-13b", 40, 5120, 40, 40, 20480, 50272, 2048, False),
        ModelShape("opt-66b", "facebook/opt-66b", 64, 9216, 72, 72, 36864, 50272, 2048, False),
        ModelShape("llama-2-7b", "meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000, 4096, True),
    )
}


@dataclass(frozen=True)
class Profile:
    """A device (None: this CPU, for the `measured` model) and a model."""

    device: Device | None
    model: ModelShape

    @property
    def name(self) -> str:
        return f"{self.device.name if self.device else 'cpu'}/{self.model.name}"


def parse_profile(spec: str) -> Profile:
    """`DEVICE/MODEL`, e.g. `a100-80g/opt-13b` or `cpu/opt-125m`; ValueError naming the choices otherwise."""
    device_name, _, model_name = spec.partition("/")
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r} in profile {spec!r}; known: {', '.join(MODELS)}")
    if device_name == "cpu":
        return Profile(None, MODELS[model_name])
    if device_name not in DEVICES:
        raise ValueError(f"unknown device {device_name!r} in profile {spec!r}; known: cpu, {', '.join(DEVICES)}")
    return Profile(DEVICES[device_name], MODELS[model_name])
