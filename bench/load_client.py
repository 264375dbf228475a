"""An async, streaming OpenAI-compatible load client: replays a seeded trace against a server.

Each request is sent at its trace time (`/v1/completions`, `stream`, `ignore_eos`, `max_tokens` = the
sample's reference length, greedy). Its TTFT and a timestamp per streamed chunk are recorded, as vLLM's
`bench serve` does. A request still running `grace_s` after the trace's last arrival is cancelled and
counts as a miss. The same client drives every system, so its overheads are shared.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import httpx
from tqdm import tqdm

from bench.datasets import Sample
from bench.slo_metrics import RequestRecord


async def _one(
    client: httpx.AsyncClient, url: str, model: str, sample: Sample, record: RequestRecord, start: float
) -> None:
    body = {
        "model": model, "prompt": sample.prompt, "max_tokens": max(1, sample.output_len), "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = str(event["error"].get("message"))
                    return
                if event.get("usage"):
                    record.output_len = int(event["usage"]["completion_tokens"])
                    record.prompt_len = int(event["usage"]["prompt_tokens"])
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        now = time.perf_counter() - start
                        if record.first_token_time is None:
                            record.first_token_time = now
                        record.token_times.append(now)
                    if choice.get("finish_reason"):
                        record.finished = choice["finish_reason"] in ("length", "stop")
    except httpx.HTTPError as err:
        record.error = f"{type(err).__name__}: {err}"


async def run_trace(
    base_url: str,
    model: str,
    samples: Sequence[Sample],
    arrivals: Sequence[float],
    grace_s: float,
    desc: str = "requests",
) -> list[RequestRecord]:
    """Send `samples[i]` at `arrivals[i]` seconds; return one record per request, in trace order."""
    url = f"{base_url}/v1/completions"
    records = [RequestRecord(request_id=str(i), arrival=a, prompt_len=s.prompt_len)
               for i, (s, a) in enumerate(zip(samples, arrivals))]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        bar = tqdm(total=len(records), desc=desc, unit="req", leave=False)
        for sample, record in zip(samples, records):
            delay = record.arrival - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_one(client, url, model, sample, record, start))
            task.add_done_callback(lambda _: bar.update())
            tasks.append(task)
        end = (arrivals[-1] if arrivals else 0.0) + grace_s
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - (time.perf_counter() - start))) if tasks else (
            set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
    for record, task in zip(records, tasks):
        if task in pending:
            record.finished, record.error = False, "unfinished at the end of the probe"
    return records
