"""The sampling fields through HTTP with the official `openai` client: logprobs equal transformers'
log-softmax of the same greedy run (fp32, within 1e-3); penalties, logit_bias, min_p and min_tokens
give transformers' tokens with its own logits processors; stop_reason, include_stop_str_in_output,
echo; bad values get OpenAI-shaped 400s naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from test_http_server import MODEL, running_server, wait_idle
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

PROMPT = "The capital of France is Paris, and the capital of Italy is"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def server(tiny_opt_with_tokenizer: Path) -> Iterator[tuple[str, object]]:
    with running_server(tiny_opt_with_tokenizer, **{"model.dtype": "float32"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf(tiny_opt_with_tokenizer: Path) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(tiny_opt_with_tokenizer, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_opt_with_tokenizer)


def hf_run(model: torch.nn.Module, prompt: list[int], max_new: int, processors: LogitsProcessorList,
           eos: int | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens under transformers' processors, and the raw log-softmax at each step."""
    ids, out, logprobs = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(ids).logits[:, -1].float()
            logprobs.append(logits[0].log_softmax(-1))
            token = int(processors(ids, logits)[0].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == eos:
                break
    return out, logprobs


def token_text(hf, token: int) -> str:
    """A token's text as logprobs name it (special tokens included)."""
    return hf[1].decode([token], skip_special_tokens=False)


def prompt_ids(hf) -> list[int]:
    return list(hf[1](PROMPT)["input_ids"])


def test_completion_logprobs_equal_transformers(client: openai.OpenAI, hf) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True})
    choice = result.choices[0]
    tokens, ref = hf_run(hf[0], prompt_ids(hf), 8, LogitsProcessorList())
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(tokens) == 8
    for i, token in enumerate(tokens):
        assert abs(lp.token_logprobs[i] - float(ref[i][token])) < TOLERANCE
        top = ref[i].topk(3)
        want = {token_text(hf, t): float(v) for t, v in zip(top.indices.tolist(), top.values.tolist())}
        assert set(lp.top_logprobs[i]) == set(want)
        assert all(abs(lp.top_logprobs[i][k] - want[k]) < TOLERANCE for k in want)
        assert lp.tokens[i] == token_text(hf, token)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    assert "".join(lp.tokens) == choice.text


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI, hf) -> None:
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name a city"}, {"type": "text", "text": "."}]}]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    text = hf[1].apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Name a city\n."}],
                                     add_generation_prompt=True, tokenize=False)
    prompt = hf[1](text, add_special_tokens=False)["input_ids"]
    tokens, ref = hf_run(hf[0], list(prompt), 6, LogitsProcessorList())
    assert len(content) == 6
    for i, entry in enumerate(content):
        assert abs(entry.logprob - float(ref[i][tokens[i]])) < TOLERANCE
        assert entry.token == token_text(hf, tokens[i]) and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2 and abs(entry.top_logprobs[0].logprob - float(ref[i].max())) < TOLERANCE


def test_streamed_logprobs_match_the_whole_answer(client: openai.OpenAI) -> None:
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].logprobs
    chunks = list(client.completions.create(stream=True, **args))
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.token_logprobs
    offsets = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.text_offset]
    assert offsets == whole.text_offset


CASES = {
    "repetition_penalty": ({"repetition_penalty": 0.3}, lambda: [RepetitionPenaltyLogitsProcessor(0.3)]),
    "logit_bias": ({"logit_bias": {"11": 9.0, "30": 7.5}},
                   lambda: [SequenceBiasLogitsProcessor({(11,): 9.0, (30,): 7.5})]),
    "min_p": ({"min_p": 0.2}, lambda: [MinPLogitsWarper(0.2)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_processors_give_transformers_tokens(client: openai.OpenAI, hf, case: str) -> None:
    fields, processors = CASES[case]
    ref, _ = hf_run(hf[0], prompt_ids(hf), 12, LogitsProcessorList(processors()))
    if case != "min_p":
        plain, _ = hf_run(hf[0], prompt_ids(hf), 12, LogitsProcessorList())
        assert ref != plain, "the processor must change this run"
    extra = {k: v for k, v in fields.items() if k != "logit_bias"} | {"ignore_eos": True}
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0,
                                       logit_bias=fields.get("logit_bias"), extra_body=extra)
    lp = result.choices[0].logprobs
    assert lp.tokens == [token_text(hf, t) for t in ref]


def test_min_tokens_and_stop_reason(client: openai.OpenAI, hf) -> None:
    eos = hf[1].eos_token_id
    ref, _ = hf_run(hf[0], prompt_ids(hf), 20, LogitsProcessorList([
        SequenceBiasLogitsProcessor({(eos,): 40.0}), MinNewTokensLengthLogitsProcessor(len(prompt_ids(hf)), 4, eos)]),
        eos=eos)
    assert len(ref) == 5 and ref[-1] == eos
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                       logit_bias={str(eos): 40}, extra_body={"min_tokens": 4})
    assert result.usage.completion_tokens == 5 and result.choices[0].finish_reason == "stop"
    assert result.choices[0].model_extra["stop_reason"] is None  # EOS, as vLLM reports it


def test_stop_string_reason_and_include_stop_str(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[3:6]
    assert stop.strip() and free.find(stop) == 3
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == free[:3] and cut.finish_reason == "stop" and cut.model_extra["stop_reason"] == stop
    kept = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == free[:6]


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == PROMPT + plain


def test_presence_and_frequency_penalties_change_the_run(client: openai.OpenAI) -> None:
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**args).choices[0].text
    penalised = client.completions.create(presence_penalty=2.0, frequency_penalty=2.0, **args).choices[0].text
    assert penalised != plain


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0), ("min_p", 1.5),
    ("min_tokens", -1), ("logit_bias", {"abc": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {"999999": 1}),
    ("logprobs", 21), ("logprobs", -1),
])
def test_bad_values_are_400_naming_the_field(server, field: str, value: object) -> None:
    base, engine = server
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4, field: value}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error", error
    wait_idle(engine)


@pytest.mark.parametrize(("body", "field"), [
    ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
])
def test_bad_chat_values_are_400_naming_the_field(server, body: dict, field: str) -> None:
    base, engine = server
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | body
    response = httpx.post(f"{base}/v1/chat/completions", json=request, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    wait_idle(engine)


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, hf) -> None:
    """The prompt's tokens come first, each scored given the tokens before it (None for the first)."""
    ids = prompt_ids(hf)
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                       logprobs=2, extra_body={"ignore_eos": True})
    lp = result.choices[0].logprobs
    with torch.no_grad():
        ref = hf[0](torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert lp.tokens[: len(ids)] == [token_text(hf, t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < TOLERANCE
        assert len(lp.top_logprobs[i]) == 2
    assert len(lp.tokens) == len(ids) + 3 and result.choices[0].text.startswith(PROMPT)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                         logprobs=2, stream=True, extra_body={"ignore_eos": True})
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == lp.tokens


def test_streamed_chat_logprobs_match_the_whole_answer(client: openai.OpenAI) -> None:
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
                logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **args))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole] and len(whole) == 8
