"""A response's choices in OpenAI's shapes: text, finish and stop reasons, and logprobs.

Logprobs come in two JSON shapes, from the engine's `TokenLogprobs`:

- completions: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, parallel lists;
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.

A token's text is that token decoded alone. A stream renders each chunk's tokens as they come: one
`LogprobsFormat` per choice keeps the running text offset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cluster.openai_protocol import ChatCompletionRequest, CompletionRequest
from cluster.streams import TextDeltas
from cluster.tokenizer import Tokenizer
from hybrid_cache.plan import TokenLogprobs
from scheduler_service.request import RequestOutput

# JSON has no -inf: vLLM's floor for a log probability of zero.
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class LogprobsFormat:
    """Renders logprobs for one choice: `chat` picks the shape; `offset` is where the first token's
    text starts in the choice's text (the prompt's length when it is echoed)."""

    def __init__(self, token_text: Callable[[int], str], chat: bool, offset: int = 0) -> None:
        self.token_text, self.chat, self.offset = token_text, chat, offset

    def render(self, logprobs: Sequence[TokenLogprobs], prompt: Sequence[tuple[int, TokenLogprobs | None]] = ()
               ) -> dict[str, Any]:
        """`logprobs` of generated tokens, after `prompt`'s (completions with `echo`: each prompt
        token with its logprobs, None for the first)."""
        if self.chat:
            return self._chat(logprobs)
        return self._completion([*prompt, *((lp.token_id, lp) for lp in logprobs)])

    def _completion(self, entries: Sequence[tuple[int, TokenLogprobs | None]]) -> dict[str, Any]:
        tokens = [self.token_text(token) for token, _ in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [None if lp is None else _finite(lp.logprob) for _, lp in entries],
            "top_logprobs": [None if lp is None else {self.token_text(t): _finite(v) for t, v in lp.top}
                             for _, lp in entries],
            "text_offset": offsets,
        }

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    def _chat(self, logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        return {"content": [
            self._entry(lp.token_id, lp.logprob) | {"top_logprobs": [self._entry(t, v) for t, v in lp.top]}
            for lp in logprobs
        ]}


class Choice:
    """One choice of a completion or chat response, rendered whole (`final`) or chunk by chunk (`chunk`).

    Text deltas come from the one `TextDeltas` of the stream; logprobs ride with the chunk that sends
    their tokens' text (held-back text holds them back too); `echo` text is sent first.
    """

    def __init__(self, index: int, chat: bool, stops: tuple[str, ...], logprobs: LogprobsFormat | None,
                 echo: str = "") -> None:
        self.index, self.chat, self.logprobs, self.echo = index, chat, logprobs, echo
        self.deltas = TextDeltas(stops)
        self._pending: list[TokenLogprobs] = []
        self._prompt_pending = bool(echo) and logprobs is not None  # echo's prompt logprobs go first

    def _logprobs(self, logprobs: Sequence[TokenLogprobs] | None, output: RequestOutput) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        prompt: list[tuple[int, TokenLogprobs | None]] = []
        if self._prompt_pending and output.prompt_logprobs is not None:
            prompt, self._prompt_pending = list(zip(output.prompt_token_ids, output.prompt_logprobs)), False
        return self.logprobs.render(logprobs or [], prompt)

    def _text(self, text: str) -> dict[str, Any]:
        return {"delta": {"content": text}} if self.chat else {"text": text}

    def final(self, output: RequestOutput) -> dict[str, Any]:
        text = self.echo + output.text
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": self.index, **body, "logprobs": self._logprobs(output.logprobs, output),
                "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}

    def chunk(self, output: RequestOutput) -> dict[str, Any] | None:
        """The chunk for this output, or None when it has nothing to send yet."""
        self._pending += output.new_logprobs or []
        delta = self.deltas.next(output)
        ended = output.finish_reason is not None
        if not delta and not ended:
            return None
        delta, self.echo = self.echo + delta, ""
        pending, self._pending = self._pending, []
        return {"index": self.index, **self._text(delta), "logprobs": self._logprobs(pending, output),
                "finish_reason": output.finish_reason, "stop_reason": output.stop_reason if ended else None}


def choice_for(body: CompletionRequest | ChatCompletionRequest, index: int, prompt: str | list[int],
               tokenizer: Tokenizer) -> Choice:
    """The choice `index` of a response to `body`, whose prompt is `prompt` (text or token ids)."""
    chat = isinstance(body, ChatCompletionRequest)
    echo = ""
    if not chat and body.echo:
        echo = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    # With echo, the prompt's own tokens (and logprobs) come first, from offset 0.
    offset = 0 if echo and body.num_prompt_logprobs is not None else len(echo)
    logprobs = None if body.num_logprobs is None else LogprobsFormat(tokenizer.token_text, chat, offset)
    return Choice(index, chat, body.stops, logprobs, echo)
