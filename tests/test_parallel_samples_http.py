"""`n`, `best_of` and `priority` over HTTP, with the official `openai` client where it can send them."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from test_http_server import MODEL, running_server, sse, wait_idle

from cluster.gateways import LocalGateway

PROMPT = "The capital of France is"
SAMPLED = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 21, "ignore_eos": True}


def create(client: openai.OpenAI, body: dict = SAMPLED, **fields: object):  # noqa: ANN201
    """`completions.create` with `body`'s fields and `fields`; vLLM's extras go in the extra body."""
    fields = body | fields
    extra = {name: fields.pop(name) for name in ("ignore_eos", "priority") if name in fields}
    return client.completions.create(**fields, extra_body=extra)


class RecordingGateway(LocalGateway):
    """The in-process gateway, remembering the priority of each request it was given."""

    priorities: list[int] = []

    async def generate(self, *args, priority: int = 0, **kwargs):  # noqa: ANN002, ANN003, ANN201
        RecordingGateway.priorities.append(priority)
        return await super().generate(*args, priority=priority, **kwargs)


@pytest.fixture(scope="module")
def server(tiny_opt_with_tokenizer: Path):  # noqa: ANN201
    with running_server(tiny_opt_with_tokenizer, gateway=RecordingGateway) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def _counter(base: str, name: str) -> float:
    page = httpx.get(f"{base}/metrics", timeout=10).text
    lines = [ln for ln in page.splitlines() if ln.startswith(f"aptserve:{name}{{")]
    assert len(lines) == 1, lines
    return float(lines[0].rsplit(" ", 1)[1])


def test_n3_returns_three_choices_from_one_prefill(server, client: openai.OpenAI) -> None:
    base, engine = server
    before = engine.stats()
    prefills, forks = _counter(base, "num_prefills_total"), _counter(base, "num_forked_samples_total")
    done = create(client, n=3)
    after = engine.stats()
    assert _counter(base, "num_prefills_total") - prefills == 1, "/metrics shows the one prefill"
    assert _counter(base, "num_forked_samples_total") - forks == 2
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert after.num_prefills - before.num_prefills == 1, "the prompt was prefilled once"
    assert after.num_forked_samples - before.num_forked_samples == 2
    assert len({c.text for c in done.choices}) == 3
    assert done.usage.completion_tokens == 3 * 8
    assert done.usage.prompt_tokens == create(client).usage.prompt_tokens
    for choice in done.choices:  # sample i is what one request seeded seed + i samples
        alone = create(client, seed=21 + choice.index)
        assert alone.choices[0].text == choice.text
    wait_idle(engine)


def test_streamed_samples_equal_the_plain_response(server, client: openai.OpenAI) -> None:
    _, engine = server
    plain = create(client, n=3)
    texts = {0: "", 1: "", 2: ""}
    finishes = {}
    for chunk in create(client, n=3, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in plain.choices}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    wait_idle(engine)


def test_chat_n2_streams_each_choice_with_its_role(server) -> None:
    base, engine = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 1.0,
            "seed": 3, "n": 2, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
        events = sse(response)
    choices = [c for e in events if isinstance(e, dict) for c in e["choices"]]
    roles = [c["index"] for c in choices if c["delta"].get("role") == "assistant"]
    assert roles == [0, 1]
    assert {c["index"] for c in choices if c["finish_reason"]} == {0, 1}
    plain = httpx.post(f"{base}/v1/chat/completions", json=body | {"stream": False}, timeout=60).json()
    assert [c["index"] for c in plain["choices"]] == [0, 1]
    wait_idle(engine)


def test_batch_prompts_times_n_number_choices_as_vllm(server, client: openai.OpenAI) -> None:
    _, engine = server
    prompts = [PROMPT, "Once upon a time"]
    done = create(client, prompt=prompts, n=2)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):  # choice i * n + j: sample j of prompt i
        single = create(client, prompt=prompt, n=2)
        assert [c.text for c in done.choices[2 * i: 2 * i + 2]] == [c.text for c in single.choices]
    wait_idle(engine)


def test_best_of_returns_the_likeliest_of_its_samples(server, client: openai.OpenAI) -> None:
    _, engine = server
    every = create(client, n=4, logprobs=0)
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in every.choices}
    best = create(client, n=2, best_of=4)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == sorted(scores, key=scores.get, reverse=True)[:2]
    assert best.choices[0].logprobs is None, "logprobs were not asked for"
    assert best.usage.completion_tokens == 4 * 8  # every sample generated counts
    wait_idle(engine)


@pytest.mark.parametrize(("extra", "says"), [
    ({"n": 2, "best_of": 3, "stream": True}, "cannot be streamed"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"n": 0}, "n must be"),
    ({"n": 65}, "n must be"),
    ({"priority": "high"}, "priority"),
])
def test_bad_sample_fields_are_400(server, extra: dict, says: str) -> None:
    base, engine = server
    response = httpx.post(f"{base}/v1/completions", json=SAMPLED | extra, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["code"] == 400
    wait_idle(engine)


def test_priority_reaches_the_gateway(server, client: openai.OpenAI) -> None:
    _, engine = server
    RecordingGateway.priorities.clear()
    create(client, priority=-3)
    create(client)
    assert RecordingGateway.priorities == [-3, 0]
    wait_idle(engine)


def test_a_client_that_leaves_mid_stream_frees_every_sample(server) -> None:
    base, engine = server
    body = SAMPLED | {"n": 4, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    wait_idle(engine)
    engine.engine.cache.check_invariants()


def test_grpc_streams_n_samples_with_their_index_and_passes_priority(server, tiny_opt_with_tokenizer: Path,
                                                                    client: openai.OpenAI) -> None:
    import asyncio

    from test_chaos_inputs import call, frontend_for

    from cluster.grpc_gen import aptserve_pb2 as pb
    from cluster.grpc_servicer import GrpcServicer

    _, engine = server
    frontend = frontend_for(engine, tiny_opt_with_tokenizer)
    frontend.gateway = RecordingGateway(engine)
    RecordingGateway.priorities.clear()
    request = pb.GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=21,
                                 ignore_eos=True, n=3, priority=4)
    replies, context = asyncio.run(call(GrpcServicer(frontend), request))
    assert context.code is None and RecordingGateway.priorities == [4]
    texts: dict[int, str] = {}
    for reply in replies:
        texts[reply.index] = texts.get(reply.index, "") + reply.text_delta
    assert [r.finished for r in replies].count(True) == 1 and replies[-1].finished
    http = create(client, n=3)
    assert texts == {c.index: c.text for c in http.choices}
    wait_idle(engine)


def test_echo_with_logprobs_gives_every_sample_the_prompts_logprobs(server, client: openai.OpenAI) -> None:
    _, engine = server
    done = create(client, n=3, echo=True, logprobs=1, max_tokens=3)
    single = create(client, echo=True, logprobs=1, max_tokens=3)
    prompt_tokens = done.usage.prompt_tokens
    expected = single.choices[0].logprobs.token_logprobs[:prompt_tokens]
    assert expected[0] is None and all(v is not None for v in expected[1:])
    for choice in done.choices:
        assert choice.text.startswith(PROMPT)
        assert choice.logprobs.token_logprobs[:prompt_tokens] == expected
        assert len(choice.logprobs.token_logprobs) == prompt_tokens + 3
    wait_idle(engine)
