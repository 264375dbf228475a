"""Parallel samples of one prompt (`n`, `best_of`): one request from the caller, several sequences.

The engine admits the request as one sequence, sample 0, which prefills the prompt once. When that
prefill completes, the engine forks the other samples from it (`Scheduler.fork`): each shares the
prompt's full blocks (reference counts in the block pool; a block is freed when its last holder
frees it) and gets a copy of the block that holds the last prompt token (copy-on-write: it writes
there next). A forked sample recomputes that one token for logits of its own and then decodes as a
running sequence like any other: the policies schedule, preempt and convert it on its own, and a
preempted sample recomputes from its own tokens. Hidden-cache samples share hidden blocks the same way
(they are read-only once written). Sample i of a seeded request is seeded `seed + i`, so each sample
draws what a single request with that seed would.

The caller sees one stream: every output carries its sample's `index`, and only the last output of
the whole group is `finished`. With `best_of > n`, every sample's log probabilities are computed and
the caller keeps the `n` whose tokens have the highest cumulative log probability (`best_samples`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from hybrid_cache.plan import MAX_INT64, SamplingParams
from scheduler_service.request import Request, RequestOutput, RequestStatus


@dataclass
class SampleGroup:
    """The samples of one request, in index order; only sample 0 exists until its prefill completes."""

    request_id: str
    num_samples: int  # generated: best_of, else n
    members: list[Request] = field(default_factory=list)
    forked: bool = False
    _ended: set[int] = field(default_factory=set)  # samples whose final output was reported

    @classmethod
    def start(cls, request: Request) -> None:
        """Make `request` sample 0 of a group when it asks for more than one sample."""
        if request.params.num_samples > 1:
            request.params = sample_params(request.params, 0)
            request.group = cls(request.request_id, request.params.num_samples, [request])

    @property
    def finished(self) -> bool:
        """Every sample ended (samples never forked are not waited for once sample 0 ended unforked)."""
        return all(member.is_finished for member in self.members)

    def live(self) -> list[Request]:
        return [member for member in self.members if not member.is_finished]

    def reports_end(self, request: Request) -> bool:
        """An output of `request` made now is the whole request's last (`finished`): every sample
        has ended and the others' final outputs were reported before this one."""
        if request.is_finished:
            self._ended.add(request.sample_index)
        return self.finished and len(self._ended) == len(self.members)

    def fork(self, parent: Request, seq_ids: Iterator[int]) -> list[Request]:
        """The samples 1.. of `parent` (sample 0, its prompt just computed), as new waiting requests
        with the same prompt, arrival, SLOs and priority; the scheduler then starts them (`Scheduler.fork`)."""
        self.forked = True
        children = []
        for index in range(1, self.num_samples):
            child = dataclasses.replace(
                parent, seq_id=next(seq_ids), prompt_token_ids=list(parent.prompt_token_ids),
                params=sample_params(parent.params, index), sample_index=index, **_FRESH_STATE,
            )
            for name in _MUTABLE:  # its own lists (empty: the parent has no output yet), never shared
                setattr(child, name, type(getattr(parent, name))(getattr(parent, name)))
            children.append(child)
        self.members.extend(children)
        return children

    def ready_to_fork(self, request: Request) -> bool:
        """`request` is sample 0 and has just computed its whole prompt: fork the others now."""
        return (not self.forked and request is self.members[0] and not request.is_finished
                and not request.output_token_ids and request.num_new_tokens == 0)


_MUTABLE = [f.name for f in dataclasses.fields(Request) if f.default_factory in (list, dict, set)]
# What a forked sample starts with, whatever its parent has reached (its lists are copied in `fork`).
_FRESH_STATE = {"status": RequestStatus.WAITING, "cache_type": None, "num_computed_tokens": 0,
                "num_preemptions": 0, "finish_reason": None, "text": "", "error": None, "abort_reason": None}


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """Sample `index`'s params: a seeded request's samples are seeded `seed + index` (wrapping within
    int64), so that they differ and each equals a single request with that seed. With `best_of > n`,
    every sample computes its tokens' log probabilities (at least the sampled token's), to rank them."""
    changes: dict[str, object] = {}
    if params.seed is not None and index:
        changes["seed"] = (params.seed + index) % (MAX_INT64 + 1)
    if params.num_samples > params.n and params.logprobs is None:
        changes["logprobs"] = 0
    return dataclasses.replace(params, **changes) if changes else params


def cumulative_logprob(output: RequestOutput) -> float:
    """The sum of the log probabilities of a finished sample's tokens (-inf when none were computed)."""
    if not output.logprobs:
        return float("-inf")
    return sum(lp.logprob for lp in output.logprobs)


def best_samples(finals: Sequence[RequestOutput], n: int) -> list[RequestOutput]:
    """The `n` finished samples with the highest cumulative log probability, best first (ties: the
    lower index first), re-indexed 0..n-1 as the choices a caller gets."""
    ranked = sorted(finals, key=lambda out: (-cumulative_logprob(out), out.index))[:n]
    return [dataclasses.replace(out, index=i) for i, out in enumerate(ranked)]


def kept_samples(finals: Mapping[int, RequestOutput], n: int) -> list[RequestOutput]:
    """The choices a caller gets from each sample's final output (by sample index): the `n` likeliest
    when more were generated (`best_of`), else the samples in index order."""
    if len(finals) > n:
        return best_samples(list(finals.values()), n)
    return [finals[j] for j in sorted(finals)]
