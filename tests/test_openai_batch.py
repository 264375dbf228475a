"""Batch prompts in /v1/completions (a list of texts or of token-id lists: one choice per prompt),
streamed or not, with the official `openai` client; chat content as text parts and the developer role."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from test_http_server import MODEL, running_server, wait_idle

PROMPTS = ["The capital of France is", "One, two, three,", "Hello"]


@pytest.fixture(scope="module")
def server(tiny_opt_with_tokenizer: Path) -> Iterator[tuple[str, object]]:
    with running_server(tiny_opt_with_tokenizer) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def one(client: openai.OpenAI, prompt: str | list[int], **fields: object):  # noqa: ANN201
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, **fields)


def test_a_batch_of_texts_answers_each_prompt(client: openai.OpenAI, server) -> None:
    singles = [one(client, p, logprobs=1) for p in PROMPTS]
    batch = one(client, PROMPTS, logprobs=1)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert [c.logprobs.token_logprobs for c in batch.choices] == [s.choices[0].logprobs.token_logprobs
                                                                  for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    wait_idle(server[1])


def test_a_batch_of_token_lists_streams_by_index(client: openai.OpenAI, server) -> None:
    prompts = [[5, 6, 7], [100, 200], [42]]
    whole = one(client, prompts, extra_body={"ignore_eos": True})
    texts = ["", "", ""]
    finished = set()
    for chunk in one(client, prompts, stream=True, extra_body={"ignore_eos": True},
                     stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
        if chunk.usage:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens == 18
    assert texts == [c.text for c in whole.choices] and finished == {0, 1, 2}
    wait_idle(server[1])


@pytest.mark.parametrize("prompt", [[], [[]], ["a", ""], ["a", [1]]])
def test_bad_batches_are_400(server, prompt: object) -> None:
    base, engine = server
    response = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2},
                          timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text
    wait_idle(engine)


def test_a_refused_prompt_in_a_batch_leaves_nothing_running(server) -> None:
    base, engine = server
    response = httpx.post(f"{base}/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": [[5, 6], [10**9]], "max_tokens": 50, "ignore_eos": True})
    assert response.status_code == 400, response.text
    wait_idle(engine)


def test_chat_text_parts_and_developer_role(client: openai.OpenAI) -> None:
    parts = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}])
    plain = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi\nthere"}])
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_chat_echo_is_refused_not_ignored(server) -> None:
    base, engine = server
    response = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "echo": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "echo", response.text
    wait_idle(engine)


def test_tokenize_takes_chat_text_parts(server) -> None:
    """/tokenize reads messages as the chat route does: text parts joined, developer as system."""
    base, _ = server
    parts = httpx.post(f"{base}/tokenize", timeout=30, json={"model": MODEL, "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]})
    plain = httpx.post(f"{base}/tokenize", timeout=30, json={"model": MODEL, "messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi\nthere"}]})
    assert parts.status_code == plain.status_code == 200, parts.text
    assert parts.json()["tokens"] == plain.json()["tokens"]
