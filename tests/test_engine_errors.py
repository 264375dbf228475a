"""Bad input raises a clear error naming the problem, changes nothing, and the engine keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import MAX_POSITIONS, VOCAB

from cluster import LLM, SamplingParams
from cluster.config import load_config
from hybrid_cache import HiddenCacheUnavailable
from scheduler_service import QueueFull, RequestStatus

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture
def llm(tiny_models: dict[str, Path], make_llm) -> LLM:
    return make_llm(tiny_models["opt"], block_size=4, num_blocks=64, cache_mode="hybrid")


def still_serves(llm: LLM) -> None:
    out = llm.generate([[5, 6, 7]], GREEDY)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "prompt is empty"),
        ([VOCAB], "outside the vocabulary"),
        ([-1, 4], "outside the vocabulary"),
        ([3] * MAX_POSITIONS, "context is"),
    ],
)
def test_bad_prompts_are_refused(llm: LLM, prompt: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([[4, 5, 6], prompt], GREEDY)
    assert not llm.engine.has_unfinished(), "the good request queued before the bad one must be withdrawn"
    still_serves(llm)


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_non_positive_max_tokens(max_tokens: int) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=max_tokens)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("temperature", -1.0, "temperature"), ("top_p", 0.0, "top_p"), ("top_k", -2, "top_k"), ("stop", [""], "stop")],
)
def test_bad_sampling_params(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_request_larger_than_the_cache_is_refused(tiny_models: dict[str, Path], make_llm) -> None:
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=8, cache_mode="kv")
    with pytest.raises(ValueError, match="cache blocks"):
        llm.generate([[3] * 30], SamplingParams(max_tokens=10))
    still_serves(llm)


def test_text_prompt_without_tokenizer(llm: LLM) -> None:
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["hello"], GREEDY)
    still_serves(llm)


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))


def test_directory_without_weights(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(tiny_models["opt"] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        LLM(str(tmp_path), num_blocks=8)


def test_corrupt_checkpoint(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(tiny_models["opt"] / "config.json", tmp_path / "config.json")
    data = (tiny_models["opt"] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt checkpoint file .*model.safetensors"):
        LLM(str(tmp_path), num_blocks=8)


def test_checkpoint_missing_a_tensor(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copy(tiny_models["opt"] / "config.json", tmp_path / "config.json")
    tensors = load_file(tiny_models["opt"] / "model.safetensors")
    del tensors["model.decoder.layers.1.fc2.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensors for: layers.1.fc2.weight"):
        LLM(str(tmp_path), num_blocks=8)


def test_unsupported_architecture(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    config = json.loads((tiny_models["opt"] / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gpt2' .* not supported"):
        LLM(str(tmp_path), num_blocks=8)


def test_grouped_query_model_refuses_hidden(tiny_models: dict[str, Path], make_llm) -> None:
    with pytest.raises(HiddenCacheUnavailable, match="hidden cache"):
        make_llm(tiny_models["llama-gqa"], num_blocks=64, cache_mode="hidden")
    llm = make_llm(tiny_models["llama-gqa"], block_size=4, num_blocks=64, cache_mode="hybrid")
    assert llm.stats().cache_mode == "kv" and llm.stats().ratio == pytest.approx(1.0)
    with pytest.raises(HiddenCacheUnavailable, match="hidden cache"):
        llm.generate([{"prompt_token_ids": [4, 5], "cache_type": "hidden"}], GREEDY)
    still_serves(llm)


def test_abort_frees_blocks_and_ends_the_request(llm: LLM) -> None:
    engine = llm.engine
    keep = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    drop = engine.add_request([8, 9, 10, 11], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.abort(drop)
    assert not engine.abort(drop), "a request is aborted once"
    ends = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                ends[out.request_id] = out
    assert ends[drop].finish_reason == "abort"
    assert ends[keep].finish_reason == "length" and len(ends[keep].token_ids) == 8


def test_duplicate_request_id(llm: LLM) -> None:
    llm.engine.add_request([4, 5], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request([4, 5], GREEDY, request_id="x")
    while llm.engine.has_unfinished():
        llm.engine.step()


def test_lifecycle_statuses_and_token_times(llm: LLM) -> None:
    engine = llm.engine
    done = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    cut = engine.add_request([8, 9], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    requests = {rid: engine.requests[rid] for rid in (done, cut)}
    assert all(r.status is RequestStatus.WAITING for r in requests.values())
    engine.step()
    assert all(r.status is RequestStatus.RUNNING for r in requests.values())
    engine.abort(cut)
    while engine.has_unfinished():
        engine.step()
    assert requests[done].status is RequestStatus.FINISHED and requests[cut].status is RequestStatus.ABORTED
    times = requests[done].token_times
    assert len(times) == 3 and times == sorted(times) and times[0] >= requests[done].arrival_time
    assert requests[done].first_token_time == times[0] and requests[done].last_token_time == times[-1]


def test_full_waiting_queue_rejects_and_changes_nothing(tiny_models: dict[str, Path], make_llm) -> None:
    config = load_config(overrides={"model.path": str(tiny_models["opt"]), "scheduler.max_waiting": 2})
    llm = make_llm(tiny_models["opt"], block_size=4, num_blocks=64, config=config)
    engine = llm.engine
    ids = [engine.add_request([4, 5, 6], GREEDY) for _ in range(2)]
    with pytest.raises(QueueFull, match="waiting queue is full"):
        engine.add_request([4, 5, 6], GREEDY)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request([], GREEDY)
    assert engine.stats().num_rejected == {"invalid": 1, "queue_full": 1}
    assert engine.stats().num_waiting == 2
    ended = set()
    while engine.has_unfinished():
        ended |= {out.request_id for out in engine.step() if out.finished}
    assert ended == set(ids)
    still_serves(llm)
