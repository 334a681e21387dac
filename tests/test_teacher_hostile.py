"""The openai: teacher against hostile or broken servers on loopback: a bad answer fails its
episode (never the run, never the cache), the API key never leaves the URL given, and a request
never outlives its deadline."""

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner

from duomem_mlx.cli import cli
from duomem_mlx.envs.base import StepResult
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.teacher_cache import CacheWriter, check_topk, read_cache_records, verify
from duomem_mlx.teacher import openai_compat
from duomem_mlx.teacher.inflight import in_order
from duomem_mlx.teacher.openai_compat import GaveUp, OpenAIClient, OpenAIPolicy, backoff, pause, retry_after


@contextmanager
def serving(answer):
    """A server on 127.0.0.1 whose every request is `answer(handler)`; yields (base URL, requests seen).
    Each request is handled once and returns; the server stops when the block ends."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def do_GET(self):
            self.handle_one()

        def do_POST(self):
            self.handle_one()

        def handle_one(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append(
                {
                    "path": self.path,
                    "method": self.command,
                    "authorization": self.headers.get("Authorization"),
                    "body": self.rfile.read(length),
                }
            )
            try:
                answer(self)
            except OSError:  # the client hung up (a test of a deadline)
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def send(handler, code: int, body: bytes, headers: dict | None = None):
    handler.send_response(code)
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


GOOD_ROW = '[{"id": 5, "logprob": -0.1}, {"id": 7, "logprob": -2.5}]'


def chat_reply(top_logprobs: str = GOOD_ROW, token: str = '"token_id:5"') -> bytes:
    """A chat completion of one token whose logprobs entry is written as raw JSON text."""
    entry = f'{{"token": {token}, "logprob": -0.1, "top_logprobs": {top_logprobs}}}'
    return (
        f'{{"choices": [{{"message": {{"content": "look"}}, "finish_reason": "stop", "logprobs": {{"content": '
        f'[{entry}]}}}}], "usage": {{"prompt_tokens": 9}}}}'
    ).encode()


def policy(url: str, vocab: int = 100) -> OpenAIPolicy:
    played = OpenAIPolicy(OpenAIClient(url, timeout=5.0, retries=0), "m", 2, 0.0, 8, vocab)
    played.start(None, None, "Find the key.", StepResult("You are in a room.", []))
    return played


def test_retry_after_nan_is_a_backoff_not_a_crash(monkeypatch):
    monkeypatch.setattr(openai_compat, "backoff", lambda attempt: 0.01)
    assert retry_after({"Retry-After": "nan"}) is None and retry_after({"Retry-After": "inf"}) is None
    answers = iter(
        [
            (503, b'{"error": "busy"}', {"Retry-After": "nan"}),
            (429, b"{}", {"Retry-After": "-inf"}),
            (200, b'{"ok": 1}', {}),
        ]
    )
    with serving(lambda h: send(h, *next(answers))) as (url, seen):
        assert OpenAIClient(url, retries=3).request("/models") == {"ok": 1} and len(seen) == 3


def test_retries_are_jittered_and_capped():
    told = [pause(0, 2.0) for _ in range(200)]
    assert 2.0 <= min(told) and max(told) <= 3.0 and len(set(told)) > 100  # not in lockstep
    assert max(pause(0, 59.0) for _ in range(50)) <= 60.0 and max(backoff(20) for _ in range(50)) <= 45.0


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_a_redirect_never_carries_the_api_key(code, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    with serving(lambda h: send(h, 200, chat_reply())) as (elsewhere, stolen):
        with serving(lambda h: send(h, code, b"", {"Location": elsewhere + "/chat/completions"})) as (url, seen):
            with pytest.raises(DuomemError, match="redirects .* pass the final URL") as error:
                OpenAIClient(url, retries=2).request("/chat/completions", {"model": "m"})
    assert stolen == [] and len(seen) == 1 and seen[0]["authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in str(error.value)


HOSTILE_ROWS = {
    "NaN": '[{"id": 5, "logprob": NaN}]',
    "Infinity": '[{"id": 5, "logprob": -Infinity}]',
    "overflow": '[{"id": 5, "logprob": -1e999}]',
    "huge": '[{"id": 5, "logprob": 1e9}]',
    "positive": '[{"id": 5, "logprob": 0.7}]',
    "string": '[{"id": 5, "logprob": "nan"}]',
    "id 2**40": '[{"id": 1099511627776, "logprob": -0.5}]',
    "id = vocab": '[{"id": 100, "logprob": -0.5}]',
    "negative id": '[{"id": -3, "logprob": -0.5}]',
    "bad token id": '[{"token": "token_id:x7", "logprob": -0.5}]',
    "not a list": '{"id": 5}',
}


@pytest.mark.parametrize("row", HOSTILE_ROWS.values(), ids=HOSTILE_ROWS.keys())
def test_a_hostile_top_logprobs_row_fails_the_episode(row):
    """Every value that would poison the cache (or crash the run) is a GaveUp: `teach` fails that episode."""
    with serving(lambda h: send(h, 200, chat_reply(row))) as (url, _):
        with pytest.raises(GaveUp):
            policy(url).act(StepResult("You are in a room.", []))


def test_hostile_json_and_sampled_tokens():
    deep = b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with serving(lambda h: send(h, 200, deep)) as (url, _):
        with pytest.raises(GaveUp, match="nested too deep"):
            policy(url).act(StepResult("obs", []))
    with serving(lambda h: send(h, 200, chat_reply(token='"token_id:x7"'))) as (url, _):  # bad sampled token: from text
        played = policy(url)
        assert played.act(StepResult("obs", [])) == "look" and played.turns[0].sampled is None
        assert played.turns[0].rows == [[(5, -0.1), (7, -2.5)]]


def test_a_request_has_a_total_deadline():
    """A server that sends one byte every 0.2 s cannot hold a 1 s request longer than its deadline."""

    def drip(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        for _ in range(100):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.2)

    with serving(drip) as (url, seen):
        client = OpenAIClient(url, timeout=1.0, retries=3)
        start = time.monotonic()
        with pytest.raises(GaveUp, match="no complete answer within 1 s"):
            client.request("/models")
        took = time.monotonic() - start
    assert took < 4.5 and len(seen) == 2 and client.abandoned == 2  # tried once more, not three times
    assert client.in_flight == 0


def test_an_answer_too_large_is_refused():
    huge = b'{"a": "' + b"x" * (openai_compat.MAX_BODY + 10) + b'"}'
    with serving(lambda h: send(h, 200, huge)) as (url, _):
        with pytest.raises(GaveUp, match="more than 32 MB"):
            OpenAIClient(url, retries=0).request("/models")


def test_teach_fails_the_episodes_of_a_hostile_server_and_caches_nothing_bad(tiny_model, tmp_path):
    """A server answering NaN and positive logprobs: every episode fails (named in the manifest),
    the run ends in order, nothing is cached and `cache verify` is clean."""

    def answer(handler):
        if handler.path.endswith("/models"):
            send(handler, 404, b"{}")
        else:
            send(handler, 200, chat_reply('[{"id": 5, "logprob": NaN}, {"id": 7, "logprob": 0.7}]'))

    out = tmp_path / "cache"
    with serving(answer) as (url, _):
        result = CliRunner().invoke(
            cli,
            [
                "teach",
                "--teacher",
                f"openai:{url}#m",
                "--teacher-tokenizer",
                str(tiny_model),
                "--env",
                "twx",
                "--episodes",
                "2",
                "--max-steps",
                "2",
                "--top-k",
                "2",
                "--keep",
                "all",
                "--concurrency",
                "2",
                "--out",
                str(out),
            ],
        )
    assert result.exit_code == 0, result.output
    failed = json.loads((out / "manifest.json").read_text())["failed"]
    assert len(failed) == 2 and all("NaN" in why for why in failed.values()) and "--resume" in result.output
    assert read_cache_records(out) == [] and verify(out) == (0, [])


def test_cache_verify_rejects_poisoned_rows():
    ids, logprobs = np.array([[5, 7], [-1, -1]], np.int32), np.array([[-0.1, -2.0], [0.0, 0.0]], np.float32)
    assert check_topk(ids, logprobs, 100) == []
    non_finite = np.array([[np.nan, np.inf], [0, 0]], np.float32)
    assert check_topk(ids, non_finite, 100) == ["topk_logprobs holds 2 non-finite values (NaN or inf)"]
    positive = np.array([[0.7, -1], [0, 0]], np.float32)
    assert check_topk(ids, positive, 100) == ["topk_logprobs holds 1 positive values (a logprob is <= 0)"]
    assert check_topk(np.array([[5, 100]], np.int32), logprobs[:1], 100) == ["topk_ids outside the vocabulary [0, 100)"]


def test_concurrency_buffers_at_most_n_finished_results():
    """The first job is slow: the other workers stop taking jobs once n results wait (so 2n - 1 at most)."""
    n, first_done, ran = 4, threading.Event(), []

    def run(_, job):
        if job == 0:
            first_done.wait(10)
        ran.append(job)
        return job

    def release():
        time.sleep(1.0)
        ran_while_stuck.append(len(ran))
        first_done.set()

    ran_while_stuck = []
    threading.Thread(target=release).start()
    assert list(in_order(list(range(40)), n, lambda i: i, run, lambda state: None)) == list(range(40))
    assert ran_while_stuck[0] <= 2 * n - 1


def test_a_failed_job_joins_and_closes_every_worker():
    """A job raises: by the time the error reaches the reader, every worker has stopped and closed its state."""
    closed, started = [], []

    def run(state, job):
        time.sleep(0.2)
        if job == 1:
            raise ValueError("bad episode")
        return job

    def start(i):
        started.append(i)
        return i

    with pytest.raises(ValueError, match="bad episode"):
        for _ in in_order(list(range(20)), 3, start, run, closed.append):
            pass
    assert sorted(closed) == sorted(started) == [0, 1, 2]
    assert not [t for t in threading.enumerate() if t.name.startswith("teach-")]


@pytest.mark.parametrize(
    "ids,logprobs,problem",
    [
        ([[5, 7]], [[np.nan, -1.0]], "non-finite"),
        ([[5, 7]], [[-np.inf, -1.0]], "non-finite"),
        ([[5, 7]], [[0.7, -1.0]], "positive"),
        ([[5, 100]], [[-0.1, -1.0]], "outside the vocabulary"),
    ],
)
def test_cache_verify_rejects_a_poisoned_shard(ids, logprobs, problem, tmp_path):
    out = tmp_path / "cache"
    settings = {"teacher": "openai:x#m", "backend": "openai", "top_k": 2, "env": "twx", "vocab_size": 100}
    with CacheWriter(out, settings) as writer:
        arrays = {
            "input_ids": np.arange(4, dtype=np.int32),
            "loss_mask": np.array([0, 0, 0, 1], np.uint8),
            "topk_ids": np.array(ids, np.int32),
            "topk_logprobs": np.array(logprobs, np.float16),
        }
        writer.add({"id": "ep0", "task": "t"}, arrays)
    result = CliRunner().invoke(cli, ["cache", "verify", str(out)])
    assert result.exit_code == 1 and "00000.safetensors" in result.output and problem in result.output
