"""The same sampling fields give the same tokens, logprobs and stop reasons over HTTP (the openai client),
gRPC (the servicer, driven directly) and the offline `LLM`; bad values are INVALID_ARGUMENT naming the
field; old gRPC clients (no new fields) are served as before."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from test_chaos_inputs import call, frontend_for
from test_http_server import MODEL, running_server

from cluster import LLM
from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.grpc_servicer import GrpcServicer
from hybrid_cache.plan import SamplingParams

PROMPT = "Once upon a time there was a"
FIELDS = dict(max_tokens=10, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.3,
              min_p=0.05, min_tokens=3)
BIAS = {17: 3.0, 99: -2.0}


@pytest.fixture(scope="module")
def server(tiny_opt_with_tokenizer: Path) -> Iterator[tuple[str, object]]:
    with running_server(tiny_opt_with_tokenizer, **{"model.dtype": "float32"}) as running:
        yield running


def grpc_generate(engine, model_dir: Path, request: pb.GenerateRequest) -> tuple[list[pb.GenerateResponse], object]:  # noqa: ANN001
    servicer = GrpcServicer(frontend_for(engine, model_dir))
    return asyncio.run(call(servicer, request))


def test_http_grpc_and_llm_agree(server, tiny_opt_with_tokenizer: Path) -> None:
    base, engine = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    http = client.completions.create(model=MODEL, prompt=PROMPT, logprobs=2, logit_bias={str(k): v for k, v in
                                     BIAS.items()}, extra_body={k: v for k, v in FIELDS.items() if k not in
                                     ("max_tokens", "temperature", "presence_penalty", "frequency_penalty")},
                                     max_tokens=10, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3)
    replies, context = grpc_generate(engine, tiny_opt_with_tokenizer, pb.GenerateRequest(
        model=MODEL, prompt=PROMPT, logprobs=2, logit_bias=BIAS, **FIELDS))
    assert context.code is None
    grpc_ids = [t for r in replies for t in r.new_token_ids]
    grpc_lps = [lp for r in replies for lp in r.logprobs]
    assert len(grpc_lps) == len(grpc_ids) == http.usage.completion_tokens
    assert [lp.token for lp in grpc_lps] == http.choices[0].logprobs.tokens
    assert [lp.logprob for lp in grpc_lps] == http.choices[0].logprobs.token_logprobs
    assert "".join(r.text_delta for r in replies) == http.choices[0].text
    assert replies[-1].finish_reason == http.choices[0].finish_reason

    llm = LLM(str(tiny_opt_with_tokenizer), dtype="float32", block_size=4, num_blocks=512)
    try:
        out = llm.generate([PROMPT], SamplingParams(logprobs=2, logit_bias=BIAS, **FIELDS))[0]
    finally:
        llm.shutdown()
    assert out.token_ids == grpc_ids
    assert [lp.logprob for lp in out.logprobs] == [lp.logprob for lp in grpc_lps]
    assert [[t for t, _ in lp.top] for lp in out.logprobs] == [[t.token_id for t in lp.top_logprobs] for lp in grpc_lps]


def test_grpc_stop_reasons(server, tiny_opt_with_tokenizer: Path) -> None:
    base, engine = server
    free, _ = grpc_generate(engine, tiny_opt_with_tokenizer, pb.GenerateRequest(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True))
    tokens = [t for r in free for t in r.new_token_ids]
    assert not free[-1].HasField("stop_token_id") and free[-1].WhichOneof("stop_reason") is None
    by_token, _ = grpc_generate(engine, tiny_opt_with_tokenizer, pb.GenerateRequest(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[tokens[2]]))
    assert by_token[-1].stop_token_id == tokens[2] and by_token[-1].finish_reason == "stop"
    text = "".join(r.text_delta for r in free)
    stop = text[4:7]
    by_string, _ = grpc_generate(engine, tiny_opt_with_tokenizer, pb.GenerateRequest(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True, stop=[stop],
        include_stop_str_in_output=True))
    assert by_string[-1].stop_string == stop
    assert "".join(r.text_delta for r in by_string) == text[: text.find(stop) + len(stop)]


@pytest.mark.parametrize(("fields", "name"), [
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"logit_bias": {5: 500.0}}, "logit_bias"), ({"logit_bias": {10**9: 1.0}}, "logit_bias"),
    ({"min_p": 2.0}, "min_p"), ({"logprobs": 50}, "logprobs"), ({"min_tokens": -2}, "min_tokens"),
])
def test_grpc_bad_values_name_the_field(server, tiny_opt_with_tokenizer: Path, fields: dict, name: str) -> None:
    base, engine = server
    replies, context = grpc_generate(engine, tiny_opt_with_tokenizer, pb.GenerateRequest(
        model=MODEL, prompt=PROMPT, max_tokens=4, **fields))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and not replies
    assert name in context.details, context.details


def test_an_old_client_message_still_parses() -> None:
    """A request encoded with only the first 14 fields (today's clients) decodes to the same request,
    with every new field unset; an old reply parser skips the new reply fields."""
    old = pb.GenerateRequest(model=MODEL, prompt="Hi", max_tokens=3, temperature=0.5, seed=4, stop=["x"])
    again = pb.GenerateRequest.FromString(old.SerializeToString())
    assert again == old and not again.HasField("logprobs") and not again.logit_bias
    reply = pb.GenerateResponse(request_id="r", new_token_ids=[1], text_delta="a",
                                logprobs=[pb.TokenLogprob(token_id=1, logprob=-0.5, rank=1)], stop_token_id=1)
    fields_1_to_7 = pb.GenerateResponse(request_id="r", new_token_ids=[1], text_delta="a")
    parsed = pb.GenerateResponse.FromString(reply.SerializeToString())
    assert parsed.request_id == fields_1_to_7.request_id and parsed.text_delta == "a"
    numbers = {f.name: f.number for f in pb.GenerateResponse.DESCRIPTOR.fields}
    assert all(numbers[name] == i + 1 for i, name in enumerate(
        ["request_id", "new_token_ids", "text_delta", "finished", "finish_reason", "prompt_tokens",
         "completion_tokens"]))
