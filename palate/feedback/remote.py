"""A judge backend for any OpenAI-compatible chat-completions server.

:class:`OpenAIBackend` sends each conversation as one ``POST {url}/chat/completions`` request to
a server such as vLLM, llama.cpp's server, Ollama or a hosted API. Settings live in
:class:`RemoteSettings`.

Soft labels (:meth:`OpenAIBackend.choice_probs`). Each request asks for a one-token reply at
temperature 0 with ``logprobs`` and ``top_logprobs``. The probability of an option is the sum of
``exp(logprob)`` over the top tokens that equal the option once surrounding whitespace is
stripped (``"A"`` and ``" A"`` both count for option ``"A"``); an option missing from the top
tokens (while another is listed) gets the smallest listed probability, an upper bound on its
own; the options' probabilities are then normalised to sum to 1. When the reply carries no log-probabilities (the server ignores the
parameter, or ``logprobs: false`` for servers that reject it), or none of the options is among
the top tokens, the reply text decides: the first option that stands alone as a word
(``"B"``, ``"(B)"``, ``"Answer: B"``, ``"**B**"``) gets probability 1. Without log-probabilities
up to 8 tokens are requested so that such text can appear.

Replies (:meth:`OpenAIBackend.generate`) are the stripped ``message.content``.

Failures. At most ``concurrency`` requests are in flight at once. A request that times out,
cannot connect, gets HTTP 429 or 5xx, or gets a reply that cannot be used (not JSON, missing
fields, empty text, no option named) is tried again up to ``retries`` times, waiting
``backoff_s * 2**attempt`` seconds before each new try, or longer when a 429/503 reply carries a
``Retry-After`` header (honoured up to 60 s). Other HTTP errors (400, 401, 404, ...) are not
retried. Every request of a batch is tried before anything is raised; then, if any request
still failed, one :class:`JudgeError` names the URL, the model, how many requests failed and the
first failure's reason. Results always come back in input order.

The API key is read from the environment variable named by ``api_key_env`` (``OPENAI_API_KEY``
by default) and sent as ``Authorization: Bearer <key>``; when that variable is unset no header is
sent, which local servers accept.
"""

from __future__ import annotations

import email.utils
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import httpx
from pydantic import Field

from palate.config import Config
from palate.errors import ConfigError, PalateError
from palate.feedback.backend import Conversation

__all__ = ["JudgeError", "OpenAIBackend", "RemoteSettings", "check_server"]

T = TypeVar("T")

MAX_RETRY_AFTER_S = 60.0  # the longest Retry-After wait honoured
BODY_EXCERPT_CHARS = 200  # how much of an error reply's body a message quotes
PARSE_MAX_TOKENS = 8  # reply length asked for when the choice is read from text


class RemoteSettings(Config):
    """How to reach an OpenAI-compatible chat-completions server."""

    url: str | None = Field(
        None,
        description="Base URL of the server, e.g. http://127.0.0.1:8080/v1; requests go to "
        "{url}/chat/completions.",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable holding the API key, sent as "
        "'Authorization: Bearer <key>'. Unset variable: no Authorization header (fine for "
        "local servers).",
    )
    timeout_s: float = Field(60, gt=0, description="Seconds to wait for each request.")
    retries: int = Field(
        3,
        ge=0,
        description="Tries after the first for a request that timed out, could not connect, "
        "got HTTP 429/5xx or an unusable reply. Other HTTP errors are never retried.",
    )
    backoff_s: float = Field(
        1.0,
        ge=0,
        description="Wait before retry n (n = 0, 1, ...) is backoff_s * 2**n seconds, or longer "
        "when a 429/503 reply carries a Retry-After header (honoured up to 60 s).",
    )
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    logprobs: bool = Field(
        True,
        description="Ask for token log-probabilities (soft labels). Turn off for servers "
        "that reject the parameter; the choice is then read from the reply text (hard labels).",
    )
    top_logprobs: int = Field(
        20, ge=1, le=20, description="How many top tokens' log-probabilities to ask for."
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fields merged into every request body (they override palate's own), "
        "e.g. {seed: 0} or server-specific sampling options.",
    )


class JudgeError(PalateError):
    """Requests to a remote judge still failed after their retries."""


class _Failure(Exception):
    """One try of one request failed; ``retry`` says whether trying again may help."""

    def __init__(self, reason: str, *, retry: bool, wait_s: float = 0.0):
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.wait_s = wait_s  # at least this long before the next try (Retry-After)


class _Malformed(_Failure):
    """The server answered 200 but the reply cannot be used."""

    def __init__(self, what: str):
        super().__init__(f"malformed reply: {what}", retry=True)


@dataclass
class _Outcome(Generic[T]):
    value: T | None = None
    error: str | None = None


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g} s"


def _retry_after_s(value: str | None) -> float:
    """Seconds asked for by a ``Retry-After`` header (delta-seconds or an HTTP date), capped;
    0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 0.0
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if not math.isfinite(seconds):
        return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _option_pattern(options: Sequence[str]) -> re.Pattern[str]:
    """Matches any option standing alone: not inside a longer word or number."""
    alternatives = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


def _first_option(text: str, options: Sequence[str]) -> str | None:
    match = _option_pattern(options).search(text)
    return match.group(0) if match else None


def _logprob_mass(reply: dict[str, Any], options: Sequence[str]) -> list[float] | None:
    """Probability of each option among the first token's top log-probabilities, or None when
    the reply has none."""
    try:
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(top, list) or not top:
        return None
    mass = dict.fromkeys(options, 0.0)
    smallest = 1.0
    for entry in top:
        if not isinstance(entry, dict):
            continue
        token, logprob = entry.get("token"), entry.get("logprob")
        if not isinstance(token, str) or not isinstance(logprob, (int, float)):
            continue
        if math.isfinite(logprob):
            smallest = min(smallest, math.exp(logprob))
        key = token.strip()
        if key in mass and math.isfinite(logprob):
            mass[key] += math.exp(logprob)
    if any(mass.values()):
        # an option outside the top K has at most the K-th token's probability: use that
        # bound rather than 0, so one listed option does not make the label certain
        mass = {o: m or smallest for o, m in mass.items()}
    return [mass[o] for o in options]


def _content(reply: dict[str, Any]) -> str:
    """``choices[0].message.content``; a malformed-reply failure when it is missing."""
    if not isinstance(reply, dict):
        raise _Malformed("not a JSON object")
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _Malformed("no choices")
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise _Malformed("choices[0] has no message")
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise _Malformed("message content is not text")
    return content


class OpenAIBackend:
    """A judge served by an OpenAI-compatible chat-completions server (see the module docs).

    One HTTP client and one thread pool per backend; call :meth:`close` (or use the backend as
    a context manager) when done.
    """

    name: str

    def __init__(self, settings: RemoteSettings, model: str):
        if not settings.url:
            raise ConfigError("remote judge: url is not set (e.g. url: http://127.0.0.1:8080/v1)")
        self.settings = settings
        self.model = model
        self.name = model
        self.url = settings.url.rstrip("/")
        self.endpoint = f"{self.url}/chat/completions"
        key = os.environ.get(settings.api_key_env)
        self._has_key = bool(key)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s),
            limits=httpx.Limits(
                max_connections=settings.concurrency,
                max_keepalive_connections=settings.concurrency,
            ),
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="palate-judge"
        )

    # ----------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the worker threads and close the HTTP connections."""
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------- protocol

    def choice_probs(
        self, conversations: Sequence[Conversation], options: Sequence[str]
    ) -> list[list[float]]:
        """For each conversation, the probability of each option, normalised over ``options``
        (from log-probabilities when the server returns them, else one-hot from the text)."""
        options = list(options)
        if not options or any(not o.strip() or o != o.strip() for o in options):
            raise ConfigError(
                f"judge answers {options}: need at least one, each non-empty without "
                "surrounding spaces"
            )
        if len(set(options)) != len(options):
            raise ConfigError(f"judge answers {options} repeat an answer")
        extra: dict[str, Any] = {"max_tokens": 1 if self.settings.logprobs else PARSE_MAX_TOKENS}
        extra["temperature"] = 0
        if self.settings.logprobs:
            extra["logprobs"] = True
            extra["top_logprobs"] = self.settings.top_logprobs

        def parse(reply: dict[str, Any]) -> list[float]:
            return self._choice_from_reply(reply, options)

        return self._run_batch(conversations, extra, parse)

    def generate(
        self, conversations: Sequence[Conversation], *, max_new_tokens: int, temperature: float
    ) -> list[str]:
        """One reply per conversation: the stripped message content."""
        extra: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature}

        def parse(reply: dict[str, Any]) -> str:
            text = _content(reply).strip()
            if not text:
                raise _Malformed("empty message content")
            return text

        return self._run_batch(conversations, extra, parse)

    # ----------------------------------------------------------------------- internals

    @staticmethod
    def _choice_from_reply(reply: dict[str, Any], options: Sequence[str]) -> list[float]:
        content = _content(reply)  # validates the reply's shape
        mass = _logprob_mass(reply, options)
        if mass is not None:
            total = sum(mass)
            if total > 0:
                return [m / total for m in mass]
        found = _first_option(content, options)
        if found is None:
            names = ", ".join(options)
            raise _Malformed(f"reply {content.strip()[:80]!r} names none of {names}")
        return [1.0 if o == found else 0.0 for o in options]

    def _run_batch(
        self,
        conversations: Sequence[Conversation],
        extra: dict[str, Any],
        parse: Callable[[dict[str, Any]], T],
    ) -> list[T]:
        bodies = [
            {"model": self.model, "messages": list(conv), **extra, **self.settings.extra_body}
            for conv in conversations
        ]
        outcomes = list(self._pool.map(lambda body: self._request(body, parse), bodies))
        failed = [o.error for o in outcomes if o.error is not None]
        if failed:
            raise JudgeError(
                f"judge {self.model!r} at {self.url}: {len(failed)} of {len(outcomes)} "
                f"requests failed (after up to {self.settings.retries} retries each); "
                f"first failure: {failed[0]}"
            )
        return [cast(T, o.value) for o in outcomes]  # all succeeded

    def _request(self, body: dict[str, Any], parse: Callable[[dict[str, Any]], T]) -> _Outcome[T]:
        """One request with its retries; never raises for server trouble."""
        attempt = 0
        while True:
            try:
                return _Outcome(value=parse(self._post(body)))
            except _Failure as failure:
                if not failure.retry or attempt >= self.settings.retries:
                    return _Outcome(error=failure.reason)
                time.sleep(max(self.settings.backoff_s * 2**attempt, failure.wait_s))
                attempt += 1

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One try: the decoded JSON reply, or a :class:`_Failure`."""
        try:
            response = self._client.post(self.endpoint, json=body)
        except httpx.TimeoutException:
            raise _Failure(
                f"timed out after {_fmt_s(self.settings.timeout_s)}", retry=True
            ) from None
        except httpx.TransportError as err:
            raise _Failure(f"connection failed: {type(err).__name__}: {err}", retry=True) from None
        except httpx.RequestError as err:  # undecodable body, redirect loop, ...
            raise _Failure(f"request failed: {type(err).__name__}: {err}", retry=True) from None
        status = response.status_code
        if not response.is_success:
            excerpt = response.text[:BODY_EXCERPT_CHARS].strip()
            reason = f"HTTP {status}: {excerpt}"
            if status in (401, 403):
                var = self.settings.api_key_env
                reason += (
                    f" (check the API key in environment variable {var})"
                    if self._has_key
                    else f" (no API key sent: environment variable {var} is not set)"
                )
            retry = status == 429 or status >= 500
            wait = (
                _retry_after_s(response.headers.get("retry-after")) if status in (429, 503) else 0.0
            )
            raise _Failure(reason, retry=retry, wait_s=wait)
        try:
            reply = response.json()
        except ValueError:
            raise _Malformed(f"not JSON: {response.text[:80]!r}") from None
        if not isinstance(reply, dict):
            raise _Malformed("not a JSON object")
        return reply


def check_server(settings: RemoteSettings, model: str) -> None:
    """Send one tiny request, without retries, and raise :class:`JudgeError` unless the server
    answers it with a well-formed chat completion (catches an unreachable server, a rejected
    key, an unknown model) — a quick check before a long run."""
    with OpenAIBackend(settings.model_copy(update={"concurrency": 1}), model) as backend:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Reply with the letter A."}],
            "max_tokens": 1,
            "temperature": 0,
            **settings.extra_body,
        }
        try:
            _content(backend._post(body))
        except _Failure as failure:
            raise JudgeError(
                f"judge {model!r} at {backend.url} is not usable: {failure.reason}"
            ) from None
