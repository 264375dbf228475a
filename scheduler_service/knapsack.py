"""The per-iteration choice of DESIGN §2 as a pure function: which requests run, with which cache type.

Each request offers up to two choices — KV (`value_kv`, `blocks_kv`) and hidden (`value_hidden`,
`blocks_hidden`) — and at most one is taken, within `capacity_blocks`, maximising the summed value.
The greedy below is a 2-approximation:

1. Clean: drop a choice that does not fit alone, has a non-positive value, or is dominated by the
   other (no more value for no fewer blocks); hidden also goes when it needs at least KV's blocks.
2. Steps: if both remain and hidden lies on or above the chord (`v_h/m_h >= v_kv/m_kv`), the request
   gives a *hidden* step and an *upgrade* step (the rest of KV); otherwise one step with its best
   remaining choice (KV if it survived, else hidden). Gains are then concave in memory.
3. Fill: steps by density, descending; take each that fits; an upgrade only after its hidden step.
4. Fallback: the best single choice that fits alone. Return whichever of (3) and (4) is worth more.

Taking steps by density plus a fraction of the first misfit is the LP optimum (>= OPT); that fraction
is worth at most one request's choice, which fits alone, so max(fill, best single) >= OPT / 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SKIP, KV, HIDDEN = "skip", "kv", "hidden"


@dataclass(frozen=True)
class CacheOption:
    """One request's choices. `value_hidden`/`blocks_hidden` are None when it may not use the hidden cache."""

    value_kv: float
    blocks_kv: int
    value_hidden: float | None = None
    blocks_hidden: int | None = None


@dataclass(frozen=True)
class _Step:
    request: int
    kind: str  # KV, HIDDEN or "upgrade"
    blocks: int
    gain: float

    @property
    def density(self) -> float:
        return self.gain / self.blocks if self.blocks else float("inf")


def _clean(option: CacheOption, capacity: int) -> dict[str, tuple[float, int]]:
    """The choices worth considering: kind → (value, blocks)."""
    choices: dict[str, tuple[float, int]] = {}
    if option.value_kv > 0 and option.blocks_kv <= capacity:
        choices[KV] = (option.value_kv, option.blocks_kv)
    if option.value_hidden is not None and option.blocks_hidden is not None:
        if option.value_hidden > 0 and option.blocks_hidden <= capacity and option.blocks_hidden < option.blocks_kv:
            choices[HIDDEN] = (option.value_hidden, option.blocks_hidden)
    if KV in choices and HIDDEN in choices and choices[KV][0] <= choices[HIDDEN][0]:
        del choices[KV]  # hidden gives at least as much for fewer blocks
    return choices


def _steps(index: int, choices: dict[str, tuple[float, int]]) -> list[_Step]:
    if KV in choices and HIDDEN in choices:
        (v_kv, m_kv), (v_h, m_h) = choices[KV], choices[HIDDEN]
        if v_h * m_kv >= v_kv * m_h:  # on or above the chord, without dividing
            return [_Step(index, HIDDEN, m_h, v_h), _Step(index, "upgrade", m_kv - m_h, v_kv - v_h)]
        return [_Step(index, KV, m_kv, v_kv)]
    return [_Step(index, kind, blocks, value) for kind, (value, blocks) in choices.items()]


def choose_cache_types(options: Sequence[CacheOption], capacity_blocks: int) -> list[str]:
    """For each option, "skip", "kv" or "hidden": within `capacity_blocks`, worth at least half the optimum."""
    cleaned = [_clean(option, capacity_blocks) for option in options]
    steps = [step for index, choices in enumerate(cleaned) for step in _steps(index, choices)]
    # Density first; at equal density the hidden step goes before its own upgrade.
    steps.sort(key=lambda s: (-s.density, s.kind == "upgrade", s.request))

    chosen = [SKIP] * len(options)
    left, fill_value = capacity_blocks, 0.0
    for step in steps:
        if left == 0:
            break  # nothing more fits (zero-block steps have infinite density and came first)
        if step.blocks > left:
            continue
        if step.kind == "upgrade":
            if chosen[step.request] != HIDDEN:
                continue
            chosen[step.request] = KV
        else:
            chosen[step.request] = step.kind
        left -= step.blocks
        fill_value += step.gain

    best_single = max(
        ((value, index, kind) for index, choices in enumerate(cleaned) for kind, (value, _) in choices.items()),
        default=None,
    )
    if best_single is not None and best_single[0] > fill_value:
        value, index, kind = best_single
        return [kind if i == index else SKIP for i in range(len(options))]
    return chosen


def total(options: Sequence[CacheOption], kinds: Sequence[str]) -> tuple[float, int]:
    """(value, blocks) of an assignment."""
    value, blocks = 0.0, 0
    for option, kind in zip(options, kinds):
        if kind == KV:
            value, blocks = value + option.value_kv, blocks + option.blocks_kv
        elif kind == HIDDEN:
            assert option.value_hidden is not None and option.blocks_hidden is not None
            value, blocks = value + option.value_hidden, blocks + option.blocks_hidden
    return value, blocks
