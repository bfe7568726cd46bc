"""OpenAIBackend against real HTTP servers on loopback: a scriptable fault-injecting fake of the
chat-completions API (FastAPI + uvicorn in a thread) and a real llama.cpp server (xllamacpp)."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from pydantic import ValidationError

from palate.errors import ConfigError
from palate.feedback.remote import (
    JudgeError,
    OpenAIBackend,
    RemoteSettings,
    _retry_after_s,
    check_server,
)

QUESTION = [{"role": "user", "content": "Which is better? Answer A or B."}]

# --------------------------------------------------------------------------- the fake server


@dataclass
class Reply:
    """What the fake server sends back for one request."""

    status: int = 200
    body: Any = None  # JSON-encoded unless ``raw`` is set
    raw: str | None = None
    delay: float = 0.0  # seconds to wait before answering
    headers: dict[str, str] = field(default_factory=dict)


Behaviour = Callable[[dict[str, Any]], Reply]


def completion(content: str | None, top: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    """A chat-completions reply; ``top`` = (token, probability) pairs for the first token."""
    choice: dict[str, Any] = {
        "index": 0,
        "finish_reason": "length",
        "message": {"role": "assistant", "content": content},
    }
    if top is not None:
        entries = [{"token": t, "logprob": math.log(p)} for t, p in top]
        choice["logprobs"] = {
            "content": [
                {"token": top[0][0], "logprob": entries[0]["logprob"], "top_logprobs": entries}
            ]
        }
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


def ok(
    content: str | None, top: list[tuple[str, float]] | None = None, delay: float = 0.0
) -> Behaviour:
    return lambda body: Reply(body=completion(content, top), delay=delay)


def fail(status: int, text: str = "boom", headers: dict[str, str] | None = None) -> Behaviour:
    return lambda body: Reply(status=status, raw=text, headers=headers or {})


def hang(seconds: float) -> Behaviour:
    return lambda body: Reply(body=completion("A"), delay=seconds)


def last_message(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


class FakeServer:
    """Serves ``POST /v1/chat/completions``; each request takes the next scripted behaviour,
    or ``default`` when the script is empty. Records requests and the peak in-flight count."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.url = ""
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.script: deque[Behaviour] = deque()
            self.default: Behaviour = ok("A")
            self.requests: list[dict[str, Any]] = []
            self.in_flight = 0
            self.max_in_flight = 0

    def push(self, *behaviours: Behaviour) -> None:
        with self.lock:
            self.script.extend(behaviours)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            with self.lock:
                self.requests.append({"body": body, "headers": dict(request.headers)})
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                behaviour = self.script.popleft() if self.script else self.default
            try:
                reply = behaviour(body)
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            finally:
                with self.lock:
                    self.in_flight -= 1
            content = reply.raw if reply.raw is not None else json.dumps(reply.body)
            return Response(
                content,
                status_code=reply.status,
                media_type="application/json",
                headers=reply.headers,
            )

        return app


def _wait_accepting(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    import uvicorn

    fake = FakeServer()
    server = uvicorn.Server(
        uvicorn.Config(fake.app(), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="fake-openai", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "fake server failed to start"
        assert time.monotonic() < deadline, "fake server did not start in 10 s"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    _wait_accepting("127.0.0.1", port)
    fake.url = f"http://127.0.0.1:{port}/v1"
    yield fake
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def fake(fake_server: FakeServer) -> FakeServer:
    fake_server.reset()
    return fake_server


def settings(url: str, **kw: Any) -> RemoteSettings:
    defaults: dict[str, Any] = {"timeout_s": 5, "backoff_s": 0.01, "api_key_env": "PALATE_TEST_KEY"}
    return RemoteSettings(url=url, **{**defaults, **kw})


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PALATE_TEST_KEY", raising=False)


# --------------------------------------------------------------------------- soft labels


def test_logprobs_path_normalises_option_mass(fake: FakeServer) -> None:
    fake.push(ok("A", top=[("A", 0.6), (" B", 0.2), ("C", 0.1)]))
    with OpenAIBackend(settings(fake.url), "judge-model") as backend:
        (probs,) = backend.choice_probs([QUESTION], ["A", "B"])
    assert probs == pytest.approx([0.75, 0.25])  # 0.6 / 0.8, 0.2 / 0.8
    body = fake.requests[0]["body"]
    assert body == {
        "model": "judge-model",
        "messages": QUESTION,
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 20,
    }


def test_logprobs_same_option_spelled_twice_adds_up(fake: FakeServer) -> None:
    fake.push(ok("A", top=[("A", 0.3), (" A", 0.2), ("B", 0.5), ("x", 0.1)]))
    with OpenAIBackend(settings(fake.url), "m") as backend:
        assert backend.choice_probs([QUESTION], ["A", "B"]) == [pytest.approx([0.5, 0.5])]


def test_an_option_missing_from_the_top_tokens_gets_the_smallest_listed_mass(
    fake: FakeServer,
) -> None:
    fake.push(ok("A", top=[("A", 0.6), ("The", 0.2), ("C", 0.1)]))
    with OpenAIBackend(settings(fake.url), "m") as backend:
        (probs,) = backend.choice_probs([QUESTION], ["A", "B"])
    assert probs == pytest.approx([0.6 / 0.7, 0.1 / 0.7])  # B ≤ the 3rd token's 0.1


def test_logprobs_without_option_mass_fall_back_to_text(fake: FakeServer) -> None:
    fake.push(ok("B", top=[("The", 0.7), ("I", 0.2)]))
    with OpenAIBackend(settings(fake.url), "m") as backend:
        assert backend.choice_probs([QUESTION], ["A", "B"]) == [[0.0, 1.0]]


def test_parsed_path_without_logprobs(fake: FakeServer) -> None:
    fake.push(ok("The answer is (B)."))
    with OpenAIBackend(settings(fake.url, logprobs=False), "m") as backend:
        assert backend.choice_probs([QUESTION], ["A", "B"]) == [[0.0, 1.0]]
    body = fake.requests[0]["body"]
    assert body["max_tokens"] == 8
    assert "logprobs" not in body and "top_logprobs" not in body


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A", [1.0, 0.0]),
        ("(B)", [0.0, 1.0]),
        ("Answer: B", [0.0, 1.0]),
        ("**A**", [1.0, 0.0]),
        ("Both Apples; B.", [0.0, 1.0]),  # the "A" inside a word does not count
        ("B, not A", [0.0, 1.0]),  # the first standalone option wins
    ],
)
def test_parsed_answers(fake: FakeServer, text: str, expected: list[float]) -> None:
    fake.push(ok(text))
    with OpenAIBackend(settings(fake.url, logprobs=False), "m") as backend:
        assert backend.choice_probs([QUESTION], ["A", "B"]) == [expected]


def test_ratings_options(fake: FakeServer) -> None:
    fake.push(ok("I'd say 7 out of 9"))
    options = [str(i) for i in range(1, 10)]
    with OpenAIBackend(settings(fake.url, logprobs=False), "m") as backend:
        (probs,) = backend.choice_probs([QUESTION], options)
    assert probs == [1.0 if o == "7" else 0.0 for o in options]


# --------------------------------------------------------------------------- failures and retries


def test_timeout_500_malformed_then_success(fake: FakeServer) -> None:
    fake.push(hang(1.0), fail(500), ok("maybe"), ok("A", top=[("A", 0.9), ("B", 0.1)]))
    cfg = settings(fake.url, timeout_s=0.5, retries=3)
    with OpenAIBackend(cfg, "m") as backend:
        assert backend.choice_probs([QUESTION], ["A", "B"]) == [pytest.approx([0.9, 0.1])]
    assert len(fake.requests) == 4


def test_malformed_json_and_missing_fields_are_retried(fake: FakeServer) -> None:
    bad_json: Behaviour = lambda body: Reply(raw="{not json")  # noqa: E731
    no_choices: Behaviour = lambda body: Reply(body={"choices": []})  # noqa: E731
    fake.push(bad_json, no_choices, ok("B"))
    with OpenAIBackend(settings(fake.url, retries=2), "m") as backend:
        assert backend.choice_probs([QUESTION], ["A", "B"]) == [[0.0, 1.0]]
    assert len(fake.requests) == 3


def test_always_500_raises_one_error_after_all_tries(fake: FakeServer) -> None:
    fake.default = fail(500, "internal trouble")
    with (
        OpenAIBackend(settings(fake.url, retries=2), "judge-x") as backend,
        pytest.raises(JudgeError) as info,
    ):
        backend.choice_probs([QUESTION], ["A", "B"])
    assert len(fake.requests) == 3  # the first try + 2 retries
    msg = str(info.value)
    assert fake.url in msg and "judge-x" in msg
    assert "HTTP 500: internal trouble" in msg
    assert "1 of 1" in msg


def test_one_bad_item_fails_the_batch_after_the_others_finish(fake: FakeServer) -> None:
    def behaviour(body: dict[str, Any]) -> Reply:
        if "bad" in last_message(body):
            return Reply(status=503, raw="overloaded")
        return Reply(body=completion("A"))

    fake.default = behaviour
    convs = [[{"role": "user", "content": c}] for c in ("good 1", "bad", "good 2")]
    with (
        OpenAIBackend(settings(fake.url, retries=1), "m") as backend,
        pytest.raises(JudgeError, match="1 of 3 requests failed") as info,
    ):
        backend.choice_probs(convs, ["A", "B"])
    assert "HTTP 503: overloaded" in str(info.value)
    assert len(fake.requests) == 2 + 2  # the good ones once, the bad one twice
    assert {last_message(r["body"]) for r in fake.requests} == {"good 1", "good 2", "bad"}


def test_reply_naming_no_option_is_reported(fake: FakeServer) -> None:
    fake.default = ok("maybe")
    with (
        OpenAIBackend(settings(fake.url, retries=1, logprobs=False), "m") as backend,
        pytest.raises(JudgeError, match="reply 'maybe' names none of A, B"),
    ):
        backend.choice_probs([QUESTION], ["A", "B"])
    assert len(fake.requests) == 2


def test_timeout_is_reported(fake: FakeServer) -> None:
    fake.default = hang(1.0)
    with (
        OpenAIBackend(settings(fake.url, retries=0, timeout_s=0.3), "m") as backend,
        pytest.raises(JudgeError, match=r"timed out after 0\.3 s"),
    ):
        backend.choice_probs([QUESTION], ["A", "B"])


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(fake: FakeServer, status: int) -> None:
    fake.default = fail(status, '{"error": "nope"}')
    with (
        OpenAIBackend(settings(fake.url, retries=3), "m") as backend,
        pytest.raises(JudgeError, match=f"HTTP {status}") as info,
    ):
        backend.choice_probs([QUESTION], ["A", "B"])
    assert len(fake.requests) == 1
    if status == 401:
        assert "PALATE_TEST_KEY" in str(info.value)


def test_401_with_a_key_names_the_variable(
    fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PALATE_TEST_KEY", "sk-wrong")
    fake.default = fail(401, "Invalid API Key")
    with (
        OpenAIBackend(settings(fake.url), "m") as backend,
        pytest.raises(JudgeError, match="PALATE_TEST_KEY"),
    ):
        backend.generate([QUESTION], max_new_tokens=5, temperature=0)
    assert len(fake.requests) == 1


def test_429_with_retry_after_is_retried(fake: FakeServer) -> None:
    fake.push(fail(429, "slow down", {"Retry-After": "0"}), ok("A"))
    with OpenAIBackend(settings(fake.url, retries=1), "m") as backend:
        assert backend.choice_probs([QUESTION], ["A", "B"]) == [[1.0, 0.0]]
    assert len(fake.requests) == 2


def test_retry_after_parsing() -> None:
    assert _retry_after_s(None) == 0
    assert _retry_after_s("2.5") == 2.5
    assert _retry_after_s("3600") == 60  # capped
    assert _retry_after_s("-4") == 0
    assert _retry_after_s("soon") == 0
    assert _retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past


def test_connection_refused_is_retried_then_reported() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with (
        OpenAIBackend(settings(url, retries=1), "m") as backend,
        pytest.raises(JudgeError, match="connection failed") as info,
    ):
        backend.choice_probs([QUESTION, QUESTION], ["A", "B"])
    assert "2 of 2" in str(info.value) and url in str(info.value)


# --------------------------------------------------------------------------- batching


def test_concurrency_limits_requests_in_flight(fake: FakeServer) -> None:
    fake.default = ok("A", delay=0.3)
    with OpenAIBackend(settings(fake.url, concurrency=2), "m") as backend:
        assert backend.choice_probs([QUESTION] * 6, ["A", "B"]) == [[1.0, 0.0]] * 6
    assert len(fake.requests) == 6
    assert fake.max_in_flight == 2


def test_results_keep_input_order(fake: FakeServer) -> None:
    def behaviour(body: dict[str, Any]) -> Reply:
        i = int(last_message(body).split()[-1])
        # later items answer sooner, so completion order is the reverse of input order
        return Reply(body=completion("A" if i % 3 == 0 else "B"), delay=0.05 * (6 - i))

    fake.default = behaviour
    convs = [[{"role": "user", "content": f"item {i}"}] for i in range(6)]
    with OpenAIBackend(settings(fake.url, concurrency=6, logprobs=False), "m") as backend:
        probs = backend.choice_probs(convs, ["A", "B"])
        texts = backend.generate(convs, max_new_tokens=4, temperature=0.7)
    assert probs == [[1.0, 0.0] if i % 3 == 0 else [0.0, 1.0] for i in range(6)]
    assert texts == ["A" if i % 3 == 0 else "B" for i in range(6)]


def test_empty_batch(fake: FakeServer) -> None:
    with OpenAIBackend(settings(fake.url), "m") as backend:
        assert backend.choice_probs([], ["A", "B"]) == []
        assert backend.generate([], max_new_tokens=3, temperature=0) == []
    assert fake.requests == []


# --------------------------------------------------------------------------- requests


def test_api_key_from_env_is_sent(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PALATE_TEST_KEY", "sk-test-123")
    with OpenAIBackend(settings(fake.url), "m") as backend:
        backend.choice_probs([QUESTION], ["A", "B"])
    assert fake.requests[0]["headers"]["authorization"] == "Bearer sk-test-123"


def test_no_key_no_authorization_header(fake: FakeServer) -> None:
    with OpenAIBackend(settings(fake.url), "m") as backend:
        backend.choice_probs([QUESTION], ["A", "B"])
    assert "authorization" not in fake.requests[0]["headers"]


def test_generate_returns_stripped_content(fake: FakeServer) -> None:
    fake.push(ok("  A fine critique.\n"))
    with OpenAIBackend(settings(fake.url), "m") as backend:
        assert backend.generate([QUESTION], max_new_tokens=32, temperature=0.5) == [
            "A fine critique."
        ]
    body = fake.requests[0]["body"]
    assert body == {"model": "m", "messages": QUESTION, "max_tokens": 32, "temperature": 0.5}


def test_generate_empty_content_is_malformed(fake: FakeServer) -> None:
    fake.default = ok(None)
    with (
        OpenAIBackend(settings(fake.url, retries=1), "m") as backend,
        pytest.raises(JudgeError, match="malformed reply: empty message content"),
    ):
        backend.generate([QUESTION], max_new_tokens=8, temperature=0)
    assert len(fake.requests) == 2


def test_extra_body_is_merged(fake: FakeServer) -> None:
    cfg = settings(fake.url, extra_body={"seed": 7, "top_k": 1})
    with OpenAIBackend(cfg, "m") as backend:
        backend.choice_probs([QUESTION], ["A", "B"])
    body = fake.requests[0]["body"]
    assert body["seed"] == 7 and body["top_k"] == 1 and body["max_tokens"] == 1


def test_check_server(fake: FakeServer) -> None:
    check_server(settings(fake.url), "m")
    fake.default = fail(404, "model 'nope' not found")
    with pytest.raises(JudgeError, match="not found"):
        check_server(settings(fake.url), "nope")
    assert len(fake.requests) == 2


def test_load_backend_checks_the_server_first(fake: FakeServer) -> None:
    """A judge on a server that rejects the key fails when it is loaded, with one request."""
    from palate.feedback.config import JudgeSettings
    from palate.feedback.judge import load_backend

    js = JudgeSettings(backend="openai", model="m", remote=settings(fake.url))
    load_backend(js).close()
    assert len(fake.requests) == 1
    fake.default = fail(401, "bad key")
    with pytest.raises(JudgeError, match="not usable.*401"):
        load_backend(js)
    assert len(fake.requests) == 2  # not retried


# --------------------------------------------------------------------------- settings


def test_settings_validation() -> None:
    assert RemoteSettings().url is None
    for bad in ({"timeout_s": 0}, {"retries": -1}, {"concurrency": 0}, {"top_logprobs": 21}):
        with pytest.raises(ValidationError):
            RemoteSettings(**bad)
    with pytest.raises(ValidationError):
        RemoteSettings(urll="http://x")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="url is not set"):
        OpenAIBackend(RemoteSettings(), "m")
    for field_info in RemoteSettings.model_fields.values():
        assert field_info.description


def test_bad_options_are_config_errors(fake: FakeServer) -> None:
    with OpenAIBackend(settings(fake.url), "m") as backend:
        for options in ([], ["A", "A"], [" A", "B"]):
            with pytest.raises(ConfigError):
                backend.choice_probs([QUESTION], options)
    assert fake.requests == []


# --------------------------------------------------------------------------- real llama.cpp

LLAMA_KEY = "sk-palate-llama-test"


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server (xllamacpp, in this process, own HTTP threads)
    serving SmolLM2-135M-Instruct on a free loopback port, requiring an API key."""
    xlc = pytest.importorskip(
        "xllamacpp", reason="xllamacpp (llama.cpp server wheel) not installed"
    )
    from palate.errors import ModelLoadError
    from palate.models import _smollm2_gguf

    try:
        gguf = _smollm2_gguf()
    except ModelLoadError as err:
        pytest.skip(str(err))
    params = xlc.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = 1024
    params.n_parallel = 2
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # a free port
    params.api_keys = [LLAMA_KEY]
    params.verbosity = -1  # quiet
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    server = xlc.Server(params)  # returns once the model is loaded and the port listens
    yield server.listening_address + "/v1"
    del server  # the server stops when its object is freed
    gc.collect()


COLOUR = [
    {
        "role": "user",
        "content": "Answer with A or B only. Which is a colour? (A) red (B) seven",
    }
]
NUMBER = [
    {
        "role": "user",
        "content": "Answer with A or B only. Which is a number? (A) blue (B) seven",
    }
]


@pytest.fixture
def llama_settings(llama_url: str, monkeypatch: pytest.MonkeyPatch) -> RemoteSettings:
    monkeypatch.setenv("PALATE_TEST_KEY", LLAMA_KEY)
    return settings(llama_url, timeout_s=60, retries=1, concurrency=2)


def test_llama_cpp_server(llama_settings: RemoteSettings) -> None:
    check_server(llama_settings, "smollm2")
    with OpenAIBackend(llama_settings, "smollm2") as backend:
        probs = backend.choice_probs([COLOUR, NUMBER], ["A", "B"])
        assert len(probs) == 2
        for p in probs:
            assert len(p) == 2 and sum(p) == pytest.approx(1.0)
            assert all(0.0 <= x <= 1.0 for x in p)
        # llama.cpp returns top_logprobs with bare "A"/"B" tokens: soft, not one-hot, labels
        assert any(0.0 < x < 1.0 for p in probs for x in p)
        (text,) = backend.generate([COLOUR], max_new_tokens=16, temperature=0)
        assert text.strip()


def test_llama_cpp_server_without_logprobs(llama_settings: RemoteSettings) -> None:
    cfg = llama_settings.model_copy(update={"logprobs": False})
    with OpenAIBackend(cfg, "smollm2") as backend:
        probs = backend.choice_probs([COLOUR, NUMBER], ["A", "B"])
    for p in probs:
        assert sorted(p) == [0.0, 1.0]  # one-hot, read from the reply text


def test_llama_cpp_server_rejects_a_wrong_key(
    llama_settings: RemoteSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PALATE_TEST_KEY", "sk-wrong")
    with (
        OpenAIBackend(llama_settings, "smollm2") as backend,
        pytest.raises(JudgeError, match="HTTP 401.*PALATE_TEST_KEY"),
    ):
        backend.generate([COLOUR], max_new_tokens=4, temperature=0)
