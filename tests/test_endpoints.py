"""`/tokenize`, `/detokenize`, `/version`, `--max-model-len` and the model's generation_config.json defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from test_http_server import COMPLETION, MODEL, running_server, wait_idle

from cluster.http_server import with_defaults
from cluster.http_tokens import server_version
from cluster.openai_protocol import ChatCompletionRequest, CompletionRequest
from worker.loader import generation_defaults

MAX_MODEL_LEN = 48


@pytest.fixture(scope="module")
def model_with_generation_config(tiny_opt_with_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("with-generation-config") / "model"
    shutil.copytree(tiny_opt_with_tokenizer, path)
    (path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 3, "do_sample": True, "eos_token_id": 2}
    ))
    return path


@pytest.fixture(scope="module")
def server(model_with_generation_config: Path):  # noqa: ANN201
    options = {"generation_defaults": generation_defaults(model_with_generation_config)}
    with running_server(model_with_generation_config, frontend_options=options,
                        **{"scheduler.max_model_len": MAX_MODEL_LEN}) as running:
        yield running


def test_tokenize_then_detokenize_round_trips(server) -> None:
    base, engine = server
    text = "The capital of France is Paris."
    with httpx.Client(base_url=base, timeout=60) as client:
        tokens = client.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 3 and tokens["max_model_len"] == MAX_MODEL_LEN
        back = client.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]})
        assert back.status_code == 200 and back.json() == {"prompt": text}
        # The same ids the completions route counts for that prompt.
        done = client.post("/v1/completions", json=COMPLETION | {"prompt": text, "max_tokens": 1}).json()
        assert done["usage"]["prompt_tokens"] == tokens["count"]
        chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["count"] == len(chat["tokens"]) and chat["count"] > 2
        assert "Hi" in client.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    wait_idle(engine)


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "exactly one"),
    ("/tokenize", {}, 400, "exactly one"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": "other", "prompt": "a"}, 404, "other"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "vocabulary"),
    ("/detokenize", {"tokens": [-1]}, 400, "vocabulary"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "other"),
])
def test_bad_token_requests_get_openai_errors(server, path: str, body: dict, status: int, says: str) -> None:
    base, _ = server
    response = httpx.post(f"{base}{path}", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and says in error["message"] + str(error["param"])


def test_version(server) -> None:
    base, _ = server
    answer = httpx.get(f"{base}/version", timeout=60).json()
    assert answer == {"version": server_version()} and answer["version"] != ""


def test_max_model_len_caps_the_context(server) -> None:
    base, engine = server
    assert engine.engine.info.max_model_len == MAX_MODEL_LEN
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN
        too_long = client.post("/v1/completions", json=COMPLETION | {"prompt": [5] * 40, "max_tokens": 9})
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
        fits = client.post("/v1/completions", json=COMPLETION | {"prompt": [5] * 40, "max_tokens": 8})
        assert fits.status_code == 200, fits.text
        prompt = client.post("/v1/completions", json=COMPLETION | {"prompt": [5] * MAX_MODEL_LEN})
        assert prompt.status_code == 400 and "48" in prompt.json()["error"]["message"]
    wait_idle(engine)


def test_a_max_model_len_beyond_the_models_is_refused(tiny_opt_with_tokenizer: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the model's context"), running_server(
        tiny_opt_with_tokenizer, **{"scheduler.max_model_len": 10**6}
    ):
        pass


def test_generation_config_sets_the_defaults_of_unset_fields(server) -> None:
    base, engine = server
    with httpx.Client(base_url=base, timeout=60) as client:
        body = {"model": MODEL, "prompt": [5, 6, 7], "ignore_eos": True}
        assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 3
        given = client.post("/v1/completions", json=body | {"max_tokens": 5}).json()
        assert given["usage"]["completion_tokens"] == 5
    wait_idle(engine)


def test_defaults_fill_only_what_the_client_left_unset() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 30, "min_p": 0.1}
    body = with_defaults(CompletionRequest(model="m", prompt="x", temperature=0.0), defaults, room=100)
    assert (body.temperature, body.top_p, body.top_k, body.max_tokens) == (0.0, 0.9, 20, 30)
    assert with_defaults(CompletionRequest(model="m", prompt="x"), defaults, room=7).max_tokens == 7  # cut to room
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], max_completion_tokens=4)
    assert with_defaults(chat, defaults, room=100).max_tokens is None  # max_completion_tokens wins
    assert with_defaults(CompletionRequest(model="m", prompt="x"), {}, room=5).temperature == 1.0


def test_generation_defaults_reads_the_known_keys(tmp_path: Path) -> None:
    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": None, "bos_token_id": 1,
                                                                 "max_new_tokens": 9, "repetition_penalty": 1.1}))
    assert generation_defaults(tmp_path) == {"temperature": 0.7, "max_tokens": 9, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="generation_config.json"):
        generation_defaults(tmp_path)
