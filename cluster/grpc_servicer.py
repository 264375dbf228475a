"""The gRPC service (aptserve.v1.AptServe) over a `Frontend`: the same checks, answers and streams as HTTP.

`AptServeRpcs` is the service itself (API key checked): Ray Serve's gRPC proxy calls the ingress's
methods by name (`cluster/serve_app.py`), direct ingress serves them under `grpc.aio`
(`cluster/direct_ingress.py`); tests drive `GrpcServicer` directly with a stand-in context.

Every failure ends the RPC with a status and a one-line detail (`cluster/errors.py`): bad input
INVALID_ARGUMENT, an unknown model NOT_FOUND, a request id in use ALREADY_EXISTS, a full queue
RESOURCE_EXHAUSTED, no engine up UNAVAILABLE, the request timeout DEADLINE_EXCEEDED, an `Abort`
CANCELLED. Whatever ends a `Generate` early (a client that cancels its call included) aborts its request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import grpc

from cluster.auth import UNAUTHORIZED_MESSAGE, metadata_authorized
from cluster.errors import ENGINE_FAILED_REQUEST, Failure, InvalidField, Kind, ModelNotFound, classify
from cluster.gateways import service_status
from cluster.grpc_gen import aptserve_pb2 as pb
from cluster.http_server import Frontend
from cluster.request_params import sampling_params
from cluster.streams import Deadline, TextDeltas
from hybrid_cache.plan import SamplingParams, TokenLogprobs
from scheduler_service.request import RequestOutput


class StatusContext(Protocol):
    """What the servicer sets on an RPC's context (Ray Serve's `RayServegRPCContext`, or grpc's own)."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...


class RpcContext(StatusContext, Protocol):
    """An RPC's context as the service reads it: its status, and the metadata the call came with."""

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None: ...


class GrpcServicer:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def generate(
        self, request: pb.GenerateRequest, grpc_context: StatusContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        received_at = time.time()
        f, gateway = self.frontend, self.frontend.gateway
        try:
            prompt, params = self._grpc_request(request)
        except Exception as err:  # noqa: BLE001 - refused before any engine saw it
            _fail(grpc_context, f.refused(err))
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        try:
            stream = await gateway.generate(
                prompt, params, request_id, request.cache_type or None,
                request.ttft_slo_ms / 1000 if request.HasField("ttft_slo_ms") else None,
                request.tbt_slo_ms / 1000 if request.HasField("tbt_slo_ms") else None,
                received_at=received_at, priority=request.priority,
            )
        except Exception as err:  # noqa: BLE001 - refused by the router or at admission
            _fail(grpc_context, f.refused(err, engine_checked=True, param="prompt"))

        async def timed_out() -> None:
            await gateway.abort(request_id, reason="timeout")

        outputs = Deadline(stream, f.request_timeout_s, on_timeout=timed_out)
        deltas: dict[int, TextDeltas] = {}  # per sample (`n`): each has its own text
        try:
            async for output in outputs:
                if output.finish_reason in _ENDED_BY:
                    _fail(grpc_context, _ENDED_BY[output.finish_reason])
                delta = deltas.setdefault(output.index, TextDeltas(tuple(request.stop))).next(output)
                yield pb.GenerateResponse(
                    request_id=request_id, index=output.index, new_token_ids=output.new_token_ids, text_delta=delta,
                    finished=output.finished, finish_reason=output.finish_reason or "",
                    prompt_tokens=len(output.prompt_token_ids), completion_tokens=len(output.token_ids),
                    logprobs=[self._logprob(lp) for lp in output.new_logprobs or ()], **_stop_reason(output),
                )
        except GrpcRequestError:
            raise
        except Exception as err:  # noqa: BLE001 - a timeout, an Abort, or the engine failed under it
            _fail(grpc_context, classify(err))
        finally:
            await outputs.aclose()  # a client that cancelled its call (or any early end) aborts the request

    def _grpc_request(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        if request.model != self.frontend.model_name:
            raise ModelNotFound(f"the model `{request.model}` does not exist (serving `{self.frontend.model_name}`)")
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise InvalidField("prompt", "give exactly one of prompt and prompt_token_ids")
        prompt = self.frontend.encode(request.prompt) if request.prompt else list(request.prompt_token_ids)
        given = {name: getattr(request, name) for name in _OPTIONAL if request.HasField(name)}
        params = sampling_params(
            len(prompt), self.frontend.gateway.max_model_len, stop=tuple(request.stop),
            stop_token_ids=tuple(request.stop_token_ids), ignore_eos=request.ignore_eos,
            logit_bias=dict(request.logit_bias) or None,
            include_stop_str_in_output=request.include_stop_str_in_output, **given,
        )
        return prompt, params

    def _logprob(self, logprobs: TokenLogprobs) -> pb.TokenLogprob:
        text = self.frontend.tokenizer.token_text
        return pb.TokenLogprob(
            token_id=logprobs.token_id, token=text(logprobs.token_id), logprob=logprobs.logprob, rank=logprobs.rank,
            top_logprobs=[pb.TopLogprob(token_id=t, token=text(t), logprob=v) for t, v in logprobs.top],
        )

    async def abort(self, request: pb.AbortRequest, grpc_context: StatusContext) -> pb.AbortResponse:
        try:
            await self.frontend.gateway.abort(request.request_id)
        except Exception as err:  # noqa: BLE001 - answered by its kind, never a traceback
            _fail(grpc_context, classify(err))
        return pb.AbortResponse(aborted=True)

    async def health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        return pb.HealthResponse(status=service_status(await self.frontend.gateway.health()))

    async def model_info(self, request: pb.ModelInfoRequest) -> pb.ModelInfoResponse:
        gateway = self.frontend.gateway
        return pb.ModelInfoResponse(model=self.frontend.model_name, max_model_len=gateway.max_model_len,
                                    vocab_size=gateway.vocab_size, replicas=gateway.num_replicas)


# Optional GenerateRequest fields that map one to one onto sampling fields (unset: the default).
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "min_p", "min_tokens", "logprobs", "n")


def _stop_reason(output: RequestOutput) -> dict[str, str | int]:
    """The reply's `stop_reason` oneof: the stop string or stop token id that ended the request."""
    reason = output.stop_reason
    if reason is None:
        return {}
    return {"stop_string": reason} if isinstance(reason, str) else {"stop_token_id": reason}

# Streams the engine ended without a result: the status the RPC ends with.
_ENDED_BY = {
    "error": ENGINE_FAILED_REQUEST,
    "abort": Failure(Kind.CANCELLED, "the request was aborted"),
}


class GrpcRequestError(Exception):
    """Ends an RPC with the status code set on its context (Serve's proxy keeps a code set before raising)."""


def _fail(context: StatusContext, failure: Failure) -> None:
    context.set_code(failure.kind.grpc_code)
    context.set_details(failure.message)
    raise GrpcRequestError(failure.message)


class AptServeRpcs:
    """The gRPC service (aptserve.v1.AptServe) over `self.grpc`, with the API key checked: Serve's gRPC
    proxy calls these methods by name; direct ingress serves them under `grpc.aio`."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.grpc = GrpcServicer(frontend)

    def _authenticate(self, grpc_context: RpcContext) -> None:
        authenticate_grpc(self.frontend, grpc_context)

    async def Generate(  # noqa: N802 - the RPC's name
        self, request: pb.GenerateRequest, grpc_context: RpcContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        self._authenticate(grpc_context)
        async for reply in self.grpc.generate(request, grpc_context):
            yield reply

    async def Abort(self, request: pb.AbortRequest, grpc_context: RpcContext) -> pb.AbortResponse:  # noqa: N802
        self._authenticate(grpc_context)
        return await self.grpc.abort(request, grpc_context)

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:  # noqa: N802
        return await self.grpc.health(request)

    async def ModelInfo(  # noqa: N802
        self, request: pb.ModelInfoRequest, grpc_context: RpcContext
    ) -> pb.ModelInfoResponse:
        self._authenticate(grpc_context)
        return await self.grpc.model_info(request)


def authenticate_grpc(frontend: Frontend, grpc_context: RpcContext) -> None:
    """End the call UNAUTHENTICATED (counted as `unauthorized`) unless its metadata carries the API key,
    when one is set."""
    if not metadata_authorized(frontend.api_key, grpc_context.invocation_metadata()):
        frontend.counters.reject("unauthorized")
        grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        grpc_context.set_details(UNAUTHORIZED_MESSAGE)
        raise GrpcRequestError(UNAUTHORIZED_MESSAGE)
