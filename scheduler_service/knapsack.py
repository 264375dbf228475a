"""The apt policy's per-iteration choice as a pure function: which requests run, with which cache type
(docs/ARCHITECTURE.md, "Scheduling: Apt").

Each request offers up to two choices — KV (`value_kv`, `blocks_kv`) and hidden (`value_hidden`,
`blocks_hidden`) — and at most one is taken, within `capacity_blocks`, maximising the summed value.
The greedy below is a 2-approximation:

1. Clean: drop a choice that does not fit alone, has a non-positive value, or is dominated by the
   other (no more value for no fewer blocks); hidden also goes when it needs at least KV's blocks and
   KV is a choice that remains (a request that may only use hidden keeps it, whatever its size).
2. Steps: if both remain and hidden lies on or above the chord (`v_h/m_h >= v_kv/m_kv`), the request
   gives a *hidden* step and an *upgrade* step (the rest of KV); otherwise one step with its best
   remaining choice (KV if it survived, else hidden). Gains are then concave in memory.
3. Fill: steps by density, descending; take each that fits; an upgrade only after its hidden step.
4. Fallback: the best single choice that fits alone. Return whichever of (3) and (4) is worth more.

Taking steps by density plus a fraction of the first misfit is the LP optimum (>= OPT); that fraction
is worth at most one request's choice, which fits alone, so max(fill, best single) >= OPT / 2.

`choose_codes` works on arrays (the scheduler calls it every iteration over up to thousands of
requests); `choose_cache_types` is the same choice over `CacheOption`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SKIP, KV, HIDDEN = "skip", "kv", "hidden"
CODE_SKIP, CODE_KV, CODE_HIDDEN, _CODE_UPGRADE = 0, 1, 2, 3
NAMES = (SKIP, KV, HIDDEN)


@dataclass(frozen=True)
class CacheOption:
    """One request's choices. `value_hidden`/`blocks_hidden` are None when it may not use the hidden cache."""

    value_kv: float
    blocks_kv: int
    value_hidden: float | None = None
    blocks_hidden: int | None = None


def choose_cache_types(options: Sequence[CacheOption], capacity_blocks: int) -> list[str]:
    """For each option, "skip", "kv" or "hidden": within `capacity_blocks`, worth at least half the optimum."""
    no_hidden = [o.value_hidden is None or o.blocks_hidden is None for o in options]
    codes = choose_codes(
        np.array([o.value_kv for o in options], dtype=np.float64),
        np.array([o.blocks_kv for o in options], dtype=np.int64),
        np.array([np.nan if skip else o.value_hidden for o, skip in zip(options, no_hidden)], dtype=np.float64),
        np.array([0 if skip else o.blocks_hidden for o, skip in zip(options, no_hidden)], dtype=np.int64),
        capacity_blocks,
    )
    return [NAMES[code] for code in codes.tolist()]


def choose_codes(
    value_kv: np.ndarray,
    blocks_kv: np.ndarray,
    value_hidden: np.ndarray,
    blocks_hidden: np.ndarray,
    capacity: int,
) -> np.ndarray:
    """Array form of `choose_cache_types`: one code per request (CODE_SKIP, CODE_KV or CODE_HIDDEN).

    `value_hidden` is NaN where the hidden cache is not allowed (its `blocks_hidden` is then ignored).
    """
    n = len(value_kv)
    chosen = np.zeros(n, dtype=np.int8)
    if n == 0 or capacity <= 0:
        return chosen
    if _all_kv_fit(value_kv, blocks_kv, value_hidden, capacity):
        chosen[:] = CODE_KV
        return chosen
    # 1. Clean.
    kv_fits = (value_kv > 0) & (blocks_kv <= capacity)
    # NaN > 0 is False: a request without the hidden choice never takes it.
    hidden_ok = (value_hidden > 0) & (blocks_hidden <= capacity) & ~(kv_fits & (blocks_hidden >= blocks_kv))
    kv_ok = kv_fits & ~(hidden_ok & (value_kv <= value_hidden))
    # 2. Steps: (request, kind, blocks, gain).
    both = kv_ok & hidden_ok
    concave = both & (value_hidden * blocks_kv >= value_kv * blocks_hidden)
    kv_step = np.flatnonzero(kv_ok & ~concave)
    hidden_step = np.flatnonzero(hidden_ok & ~(both & ~concave))
    upgrade = np.flatnonzero(concave)
    request = np.concatenate([kv_step, hidden_step, upgrade])
    kind = np.concatenate([
        np.full(len(kv_step), CODE_KV), np.full(len(hidden_step), CODE_HIDDEN), np.full(len(upgrade), _CODE_UPGRADE)
    ])
    blocks = np.concatenate(
        [blocks_kv[kv_step], blocks_hidden[hidden_step], blocks_kv[upgrade] - blocks_hidden[upgrade]]
    )
    gain = np.concatenate([value_kv[kv_step], value_hidden[hidden_step], value_kv[upgrade] - value_hidden[upgrade]])
    if len(request) == 0:
        return chosen
    # 3. Fill by density; at equal density a hidden step goes before its own upgrade.
    density = np.divide(gain, blocks, out=np.full(len(gain), np.inf), where=blocks > 0)
    order = np.lexsort((request, kind == _CODE_UPGRADE, -density))
    if int(blocks.sum()) <= capacity:
        fill_value = _fill_all(chosen, request[order], kind[order], gain[order])
    else:
        fill_value = _fill(chosen, request[order], kind[order], blocks[order], gain[order], capacity)
    # 4. The best single choice, if worth more.
    best_kv = np.where(kv_ok, value_kv, -np.inf)
    best_hidden = np.where(hidden_ok, value_hidden, -np.inf)
    i_kv, i_hidden = int(np.argmax(best_kv)), int(np.argmax(best_hidden))
    best_value, best_index, best_code = max(
        (best_kv[i_kv], i_kv, CODE_KV), (best_hidden[i_hidden], i_hidden, CODE_HIDDEN)
    )
    if best_value > fill_value:
        chosen[:] = CODE_SKIP
        chosen[best_index] = best_code
    return chosen


def _all_kv_fit(value_kv: np.ndarray, blocks_kv: np.ndarray, value_hidden: np.ndarray, capacity: int) -> bool:
    """The common case of the running requests, decided without the steps below: no request has a
    hidden choice worth anything, every KV value is positive and all KV choices fit together. Then
    every request is a KV step, the fill takes them all, and their sum (of positive values, in any
    order) is at least the best single value: every request gets KV, whatever the densities."""
    return bool(not (value_hidden > 0).any() and (value_kv > 0).all() and int(blocks_kv.sum()) <= capacity)


def _fill(chosen: np.ndarray, request: np.ndarray, kind: np.ndarray, blocks: np.ndarray, gain: np.ndarray,
          capacity: int) -> float:
    """Step 3 over steps in fill order: take each that fits (an upgrade only after its hidden step);
    set `chosen`; the summed gain taken, added in that order."""
    # Once what is left is below every later step's size, nothing more can be taken.
    smallest_after = np.minimum.accumulate(blocks[::-1])[::-1].tolist()
    left, fill_value = capacity, 0.0
    for position, (i, k, m, g) in enumerate(zip(request.tolist(), kind.tolist(), blocks.tolist(), gain.tolist())):
        if left < smallest_after[position]:
            break
        if m > left:
            continue
        if k == _CODE_UPGRADE:
            if chosen[i] != CODE_HIDDEN:
                continue
            chosen[i] = CODE_KV
        else:
            chosen[i] = k
        left -= m
        fill_value += g
    return fill_value


def _fill_all(chosen: np.ndarray, request: np.ndarray, kind: np.ndarray, gain: np.ndarray) -> float:
    """`_fill` when every step fits together (the common case: memory is not short), without its loop:
    every hidden and KV step is taken, and an upgrade exactly when its hidden step came before it.
    Returns the same sum, added in the same order (`cumsum` adds left to right, as `_fill` does)."""
    upgrade = kind == _CODE_UPGRADE
    position = np.empty(len(chosen), dtype=np.int64)
    position[request[~upgrade]] = np.flatnonzero(~upgrade)  # each request's own (hidden or KV) step
    taken = ~upgrade
    taken[upgrade] = position[request[upgrade]] < np.flatnonzero(upgrade)
    chosen[request[~upgrade]] = kind[~upgrade]
    chosen[request[upgrade & taken]] = CODE_KV
    return float(np.cumsum(gain[taken])[-1]) if taken.any() else 0.0


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
