"""`server.ingress: proxy`, the KubeRay manifests' mode: the same routes through Ray Serve's proxy actors.

Its own module: Serve runs one way per Ray session, and `tests/test_serve.py` holds a direct-ingress
server for the whole of its module.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from test_serve import MODEL, serving

from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.grpc_gen import aptserve_pb2_grpc as pb_grpc


def test_serve_proxy_ingress_answers_http_and_grpc(tiny_opt_with_tokenizer: Path) -> None:
    """`server.ingress: proxy` (the KubeRay manifests' mode): the same routes through Serve's proxies."""
    with serving(tiny_opt_with_tokenizer, **{"server.ingress": "proxy"}) as proxied:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        http = httpx.post(f"{proxied.base}/v1/completions", json=body, timeout=60).json()
        with grpc.insecure_channel(proxied.grpc) as channel:
            stub = pb_grpc.AptServeStub(channel)
            request = pb.GenerateRequest(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                         ignore_eos=True)
            replies = list(stub.Generate(request))
            with pytest.raises(grpc.RpcError) as bad:
                list(stub.Generate(pb.GenerateRequest(model=MODEL, prompt="x", temperature=-1)))
    assert "".join(r.text_delta for r in replies) == http["choices"][0]["text"] != ""
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in bad.value.details()
