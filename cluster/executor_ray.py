"""The Ray executor: one worker actor per tensor-parallel rank, placed by a placement group.

Ray creates, places and kills the ranks; the steps themselves travel over the step channel
(`worker.step_channel`): one TCP connection per rank, to the rank's node address (127.0.0.1 on a
local Ray), opened when the group starts and authenticated with a token that only this executor and
its ranks know. Each step the encoded plan is written once to every rank and rank 0's answer carries
the sampled tokens and its timings: about 0.1 ms of transport where a Ray call per rank cost several
(docs/ARCHITECTURE.md, "Step dispatch").
If a rank dies (its connection closes), fails the step or does not answer within the step timeout,
the group is torn down and rebuilt (every rank reloads its shard) and the step raises ExecutorFailed,
so the engine ends the running requests with an error and new ones succeed. A start that fails (a
rank dies in its constructor, say) leaves nothing behind: its actors are killed and its placement
group removed, so a later start finds the CPUs free.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
import time
import uuid
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hybrid_cache.config import CacheConfig
from hybrid_cache.info import WorkerInfo
from hybrid_cache.plan import BatchPlan
from hybrid_cache.plan_codec import decode_sampled, decode_timings, encode_plan
from scheduler_service.executor import ExecutorFailed
from worker.config import ModelConfig
from worker.rank_worker import RankWorker
from worker.step_channel import StepChannelError, StepClient

log = logging.getLogger(__name__)


class RayExecutor:
    """Implements `scheduler_service.Executor` over `tp_size` RankWorker actors."""

    def __init__(
        self,
        model: ModelConfig,
        cache: CacheConfig,
        tp_size: int,
        cpus_per_worker: float,
        collective_timeout_s: float,
        step_timeout_s: float,
    ) -> None:
        self.model, self.cache, self.tp_size = model, cache, tp_size
        self.cpus_per_worker = cpus_per_worker
        self.collective_timeout_s, self.step_timeout_s = collective_timeout_s, step_timeout_s
        self.num_rebuilds = 0
        self.is_shut_down = False
        self._start()

    def _start(self) -> None:
        """Start the group; on any failure, kill what was created and remove the placement group."""
        self.workers: list = []
        self.group = None
        self.channel: StepClient | None = None
        self._timings: dict[str, float] | None = None  # rank 0's, from its last answer
        try:
            self._create_group()
        except BaseException:
            log.error("the tensor-parallel group failed to start: releasing its actors and placement group")
            self._stop()
            raise

    def _create_group(self) -> None:
        gpu = self.model.device.startswith("cuda")
        bundle = {"GPU": 1.0} if gpu else {"CPU": self.cpus_per_worker}
        # One node for the whole group: the ranks meet through a file and talk over loopback.
        self.group = placement_group([dict(bundle) for _ in range(self.tp_size)], strategy="STRICT_PACK")
        ray.get(self.group.ready(), timeout=self.step_timeout_s)
        actor = ray.remote(RankWorker)
        # A fresh rendezvous path per group. The ranks share their node's file system, which may not be
        # this actor's (a scheduler actor reserves no resources and can run on another node, e.g. the
        # KubeRay head): each rank creates the directory where it runs.
        rendezvous = str(Path(tempfile.gettempdir()) / f"aptserve-tp-{uuid.uuid4().hex}" / "rendezvous")
        # Threads: Ray may set OMP_NUM_THREADS from the bundle; the model config's count wins, explicitly.
        model = self.model
        if model.num_threads is None and not gpu:
            model = model.model_copy(update={"num_threads": max(1, int(self.cpus_per_worker))})
        for rank in range(self.tp_size):
            self.workers.append(actor.options(
                num_cpus=0 if gpu else self.cpus_per_worker,
                num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
                max_restarts=0,
            ).remote(model, self.cache, rank, self.tp_size, rendezvous, self.collective_timeout_s))
        self._info: WorkerInfo = ray.get(self.workers[0].info.remote(), timeout=self.step_timeout_s)
        self.ranks = ray.get([w.describe.remote() for w in self.workers], timeout=self.step_timeout_s)
        self.channel = self._open_channel()
        log.info("tensor-parallel group of %d ranks ready: %s", self.tp_size, self.ranks)

    def _open_channel(self) -> StepClient:
        """Each rank listens on its node's address (127.0.0.1 on a local Ray: `cluster.ray_runtime`)."""
        node_id = ray.util.placement_group_table(self.group)["bundles_to_node_id"][0]
        host = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
        token = secrets.token_hex(32)
        addresses = ray.get(
            [w.open_step_channel.remote(host, token, self.step_timeout_s) for w in self.workers],
            timeout=self.step_timeout_s,
        )
        return StepClient([tuple(a) for a in addresses], token, self.step_timeout_s)

    def _stop(self) -> None:
        """Kill the ranks and remove the placement group; safe on a half-started group."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead: nothing to release
                log.debug("could not kill a rank", exc_info=True)
        self.workers = []
        if self.group is not None:
            try:
                remove_placement_group(self.group)
            except Exception:  # noqa: BLE001 - already removed
                log.debug("could not remove the placement group", exc_info=True)
            self.group = None

    def rebuild(self) -> None:
        """Tear the group down and start it again (each rank reloads its shard)."""
        self._stop()
        self._start()
        self.num_rebuilds += 1

    def info(self) -> WorkerInfo:
        return self._info

    def execute(self, plan: BatchPlan) -> list[int]:
        if self.channel is None:
            if self.is_shut_down:
                raise ExecutorFailed("the executor was shut down")
            self.rebuild()  # the last rebuild failed: start the group again before this step
            assert self.channel is not None
        try:
            answers = self.channel.run(encode_plan(plan))
        except StepChannelError as err:
            started = time.monotonic()
            self.rebuild()
            log.error("rebuilt the worker group in %.1f s after: %s", time.monotonic() - started, err)
            raise ExecutorFailed(str(err)) from err
        self._timings = decode_timings(answers[0])
        return decode_sampled(answers[0])

    def timings(self) -> dict[str, float]:
        """Rank 0's cumulative timings: those its last answer carried (no call, so reading them after
        every step disturbs nothing), or, before this group's first step, asked of the rank."""
        if self._timings is not None:
            return dict(self._timings)
        return ray.get(self.workers[0].timings.remote(), timeout=self.step_timeout_s)

    def shutdown(self) -> None:
        self.is_shut_down = True
        self._stop()
