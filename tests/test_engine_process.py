"""The engine process's call transport (`cluster/engine_process.py`) and the OpenMP team hand-over
(`worker/openmp.py`): what the one-process runtime's speed rests on."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from cluster.engine_process import EngineConnection, EngineProcessError, serve_connection
from scheduler_service.engine import QueueFull
from worker.openmp import release_openmp_team


class TwoPartError(Exception):
    """Pickles, but does not unpickle (its constructor wants two arguments, its args hold one)."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")


class FakeService:
    """Answers like an `EngineService`; `poll` waits until `release` is set."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.release = asyncio.Event()

    async def add_request(self, caller: str, request_id: str, *args: object, **kwargs: object) -> None:
        if request_id == "full":
            raise QueueFull("the waiting queue is full")
        if request_id == "bad":
            raise ValueError("max_tokens must be at least 1")
        self.added.append(request_id)

    async def poll(self, caller: str, timeout_s: float) -> list[str]:
        await self.release.wait()
        return list(self.added)

    async def abort(self, request_id: str, reason: str = "client") -> None:
        self.added.remove(request_id)

    async def stats(self) -> object:
        return lambda: None  # not picklable

    async def health(self) -> bool:
        return True

    async def model_info(self) -> dict[str, int]:
        if self.added == ["broken"]:
            raise TwoPartError("model_info", "broken")
        return {"max_model_len": 64, "vocab_size": 100}


async def _serving(tmp_path: Path, service: FakeService) -> tuple[asyncio.AbstractServer, EngineConnection]:
    address = str(tmp_path / "engine.sock")
    server = await asyncio.start_unix_server(lambda r, w: serve_connection(service, r, w), path=address)
    return server, EngineConnection(address)


def test_calls_answer_in_order_with_the_engines_own_errors(tmp_path: Path) -> None:
    async def main() -> None:
        service = FakeService()
        server, engine = await _serving(tmp_path, service)
        async with server:
            poll = engine.poll.remote("c", 5.0)  # a long poll must not hold up the calls behind it
            sent = [engine.add_request.remote("c", rid, [1, 2]) for rid in ("a", "b")]  # sent before connecting
            assert await asyncio.gather(*sent) == [None, None]
            with pytest.raises(QueueFull, match="queue is full"):
                await engine.add_request.remote("c", "full", [1])
            with pytest.raises(ValueError, match="max_tokens"):
                await engine.add_request.remote("c", "bad", [1])
            with pytest.raises(RuntimeError, match="not sendable"):
                await engine.stats.remote()
            assert not poll.done()
            await engine.abort.remote("a")
            service.release.set()
            assert await poll == ["b"]
            assert await engine.model_info.remote() == {"max_model_len": 64, "vocab_size": 100}
            with pytest.raises(AttributeError):
                engine.shutdown  # noqa: B018 - only the service's calls exist

    asyncio.run(main())


def test_a_lost_engine_fails_every_pending_and_later_call(tmp_path: Path) -> None:
    async def main() -> None:
        service = FakeService()
        server, engine = await _serving(tmp_path, service)
        assert await engine.health.remote() is True
        poll = engine.poll.remote("c", 60.0)
        await asyncio.sleep(0.05)
        server.close()
        for task in [t for t in asyncio.all_tasks() if "serve_connection" in repr(t.get_coro())]:
            task.cancel()  # the child's handlers end as when the process dies
        with pytest.raises(EngineProcessError, match="lost the engine process"):
            await asyncio.wait_for(poll, 10)
        with pytest.raises(EngineProcessError):
            await engine.health.remote()

    asyncio.run(main())


def test_an_answer_that_does_not_unpickle_fails_the_calls_instead_of_hanging(tmp_path: Path) -> None:
    async def main() -> None:
        server, engine = await _serving(tmp_path, FakeService())
        async with server:
            await engine.add_request.remote("c", "broken", [1])
            with pytest.raises(EngineProcessError, match="unreadable answer"):
                await asyncio.wait_for(engine.model_info.remote(), 10)
            with pytest.raises(EngineProcessError):
                await engine.health.remote()

    asyncio.run(main())


def test_an_unreachable_engine_fails_the_call(tmp_path: Path) -> None:
    async def main() -> None:
        engine = EngineConnection(str(tmp_path / "nobody.sock"))
        with pytest.raises(EngineProcessError, match="cannot reach"):
            await asyncio.wait_for(engine.health.remote(), 10)

    asyncio.run(main())


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_a_thread_done_with_kernels_hands_its_openmp_workers_back() -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("needs a team of at least two OpenMP threads")  # CI and dev machines have 2 cores
    counts: dict[str, int] = {}

    def load_then_release() -> None:
        x = torch.randn(512, 512)
        before = _threads()
        x @ x  # a parallel kernel: this thread gets a team of workers
        counts["with team"] = _threads() - before
        assert release_openmp_team()
        deadline = time.monotonic() + 10  # the workers exit on their own time
        while _threads() > before and time.monotonic() < deadline:
            time.sleep(0.01)
        counts["released"] = _threads() - before
        x @ x  # still usable: a fresh team
        counts["again"] = _threads() - before

    thread = threading.Thread(target=load_then_release)
    thread.start()
    thread.join()
    assert counts["with team"] >= 1
    assert counts["released"] == 0
    assert counts["again"] == counts["with team"]
