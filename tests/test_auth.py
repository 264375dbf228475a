"""`--api-key` / APTSERVE_API_KEY: requests without the bearer token get 401 in OpenAI's error shape;
/health and /metrics stay open; the gRPC servicer asks the same key."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from test_http_server import COMPLETION, running_server, wait_idle

from cluster.auth import bearer_matches
from cluster.config import API_KEY_ENV, load_config

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def server(tiny_opt_with_tokenizer: Path):  # noqa: ANN201
    with running_server(tiny_opt_with_tokenizer, frontend_options={"api_key": KEY}) as running:
        yield running


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 401 and error["type"] == "authentication_error" and "API key" in error["message"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_requests_without_the_key_get_401_and_reach_no_engine(server) -> None:
    base, engine = server
    before = engine.stats()
    with httpx.Client(base_url=base, timeout=60) as client:
        assert_401(client.post("/v1/completions", json=COMPLETION))
        assert_401(client.post("/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer wrong"}))
        assert_401(client.post("/v1/completions", json=COMPLETION, headers={"Authorization": KEY}))  # no scheme
        assert_401(client.post("/v1/chat/completions", json={"model": "tiny-opt", "messages": []}))
        assert_401(client.get("/v1/models"))
        assert_401(client.post("/tokenize", json={"prompt": "hi"}))
        assert_401(client.get("/version"))
        # A body the routes would refuse (bad JSON) is not even read without the key.
        assert_401(client.post("/v1/completions", content=b"{not json"))
    wait_idle(engine)
    after = engine.stats()
    assert after.num_steps == before.num_steps and after.num_rejected == before.num_rejected
    assert after.metrics.prompt_tokens == before.metrics.prompt_tokens


def test_the_key_opens_every_route(server) -> None:
    base, engine = server
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base, timeout=60, headers=auth) as client:
        response = client.post("/v1/completions", json=COMPLETION | {"max_tokens": 2})
        assert response.status_code == 200, response.text
        assert client.get("/v1/models").status_code == 200
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        assert client.get("/version").status_code == 200
        lower = client.get("/v1/models", headers={"Authorization": f"bearer {KEY}"})  # the scheme is case-blind
        assert lower.status_code == 200
    wait_idle(engine)


def test_health_and_metrics_stay_open_and_refusals_are_counted(server) -> None:
    base, _ = server
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/health").status_code == 200
        client.get("/v1/models")  # refused: counted
        page = client.get("/metrics")
        assert page.status_code == 200
        assert 'reason="unauthorized",replica="ingress"' in page.text


def test_the_official_client_sends_the_key(server) -> None:
    openai = pytest.importorskip("openai")
    base, _ = server
    good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny-opt", prompt="Hello", max_tokens=2).choices[0].text is not None
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny-opt", prompt="Hello", max_tokens=2)


def test_the_key_comes_from_the_config_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert load_config().server.resolved_api_key() is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert load_config().server.resolved_api_key() == "from-env"
    assert load_config(overrides={"server.api_key": "given"}).server.resolved_api_key() == "given"
    assert "given" not in repr(load_config(overrides={"server.api_key": "given"}))


def test_bearer_matching() -> None:
    assert bearer_matches(f"Bearer {KEY}", KEY) and bearer_matches(f"  bearer   {KEY} ", KEY)
    for header in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", "Bearer", f"Bearer {KEY[:-1]}"):
        assert not bearer_matches(header, KEY), header


class _Context:
    """A stand-in for Serve's gRPC context: the call's metadata, and the status set on it."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata, self.code, self.details = metadata, None, None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: object) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def test_grpc_calls_carry_the_same_key() -> None:
    import grpc

    from cluster.auth import metadata_authorized
    from cluster.grpc_servicer import GrpcRequestError, authenticate_grpc
    from cluster.http_server import Frontend

    assert metadata_authorized(None, []) and metadata_authorized(KEY, [("authorization", f"Bearer {KEY}")])
    assert not metadata_authorized(KEY, []) and not metadata_authorized(KEY, [("authorization", "Bearer x")])
    frontend = Frontend(gateway=None, tokenizer=None, model_name="m", request_timeout_s=1.0, api_key=KEY)
    before = 0
    denied = _Context([("request_id", "r")])
    with pytest.raises(GrpcRequestError):
        authenticate_grpc(frontend, denied)
    assert denied.code == grpc.StatusCode.UNAUTHENTICATED and "API key" in denied.details
    assert frontend.counters.rejected()["unauthorized"] == before + 1
    allowed = _Context([("authorization", f"Bearer {KEY}")])
    authenticate_grpc(frontend, allowed)
    assert allowed.code is None
