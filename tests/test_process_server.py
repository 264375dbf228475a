"""`server.runtime: process`: `aptserve serve` with HTTP and gRPC in its own process and the engine in one
child process, no Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from test_direct_ingress import free_port, port_taken

from bench.serve_bench import wait_healthy
from cluster import LLM, SamplingParams
from cluster.config import load_config
from cluster.engine_process import EngineProcessError
from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.grpc_gen import aptserve_pb2_grpc as pb_grpc
from cluster.process_server import ProcessServer

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny-opt"
PROMPT = "Once upon a time"
CACHE = {"cache.block_size": 4, "cache.num_blocks": 128}


def test_serve_command_runs_one_process_that_answers_http_and_grpc_and_stops_on_sigterm(
    tiny_opt_with_tokenizer: Path,
) -> None:
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "cluster.cli", "serve", "--model", str(tiny_opt_with_tokenizer),
               "--port", str(http_port), "--set", "server.runtime=process", "--set", f"server.grpc_port={grpc_port}",
               "--set", f"server.served_model_name={MODEL}"]
    for key, value in CACHE.items():
        command += ["--set", f"{key}={value}"]
    process = subprocess.Popen(command, cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        try:
            wait_healthy(base, process, timeout_s=120)
        except RuntimeError as err:
            process.kill()
            pytest.fail(f"{err}:\n{process.communicate()[0]}")
        # No Ray at all: the server process, its one engine process and multiprocessing's resource tracker.
        children = {" ".join(child.cmdline()): child for child in psutil.Process(process.pid).children(recursive=True)}
        engines = [child for command, child in children.items() if "spawn_main" in command]
        assert len(engines) == 1
        assert all("resource_tracker" in command for command, child in children.items() if child not in engines)

        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        http = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert http.status_code == 200, http.text
        bad = httpx.post(f"{base}/v1/completions", json=body | {"max_tokens": -1}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.AptServeStub(channel)
            assert stub.Health(pb.HealthRequest()).status == "ok"
            request = pb.GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
            grpc_text = "".join(reply.text_delta for reply in stub.Generate(request))
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'aptserve:step_seconds_total{model="tiny-opt",part="model"' in metrics

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not port_taken(http_port) and not port_taken(grpc_port)
        assert not engines[0].is_running(), "the engine process outlived the server"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    llm = LLM(str(tiny_opt_with_tokenizer), block_size=4, num_blocks=128)
    try:
        offline = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].text
    finally:
        llm.shutdown()
    assert http.json()["choices"][0]["text"] == grpc_text == offline


def test_a_dead_engine_process_ends_its_streams_and_the_server(tiny_opt_with_tokenizer: Path) -> None:
    overrides = {"model.path": str(tiny_opt_with_tokenizer), "server.runtime": "process",
                 "server.port": free_port(), "server.grpc_port": free_port(),
                 "server.served_model_name": MODEL} | CACHE | {"cache.num_blocks": 512}
    with pytest.raises(ValueError, match="one engine replica"):
        ProcessServer(load_config(overrides=overrides | {"parallel.replicas": 2}))
    server = ProcessServer(load_config(overrides=overrides))
    server.start()
    base = f"http://127.0.0.1:{overrides['server.port']}"
    try:
        assert server.alive()
        # long enough (1,500 steps) to be mid-stream when the engine dies
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # it is generating
            os.kill(server.engine.process.pid, signal.SIGKILL)  # the engine process dies mid-stream
            rest = "\n".join(lines)
        # The stream ends with an error event, not silently and not never.
        assert '"error"' in rest and "[DONE]" not in rest.split('"error"')[0]
        deadline = time.monotonic() + 30
        while server.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not server.alive()  # `aptserve serve` exits, for its supervisor to restart it
    finally:
        server.stop()
    assert not port_taken(overrides["server.port"]) and not port_taken(overrides["server.grpc_port"])


def test_an_engine_that_cannot_start_says_why(tmp_path: Path) -> None:
    overrides = {"model.path": str(tmp_path / "no-such-model"), "server.runtime": "process"} | CACHE
    with pytest.raises(EngineProcessError, match="failed to start: .*no-such-model"):
        ProcessServer(load_config(overrides=overrides))
