"""The `openai:<base-url>#<model>` teacher: any OpenAI-compatible server (vLLM, llama.cpp,
mlx_lm.server); top-k from `top_logprobs`, aligned to the local tokenization of the chat."""

import email.utils
import http.client
import json
import math
import os
import random
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duomem_mlx.errors import DuomemError
from duomem_mlx.memory.writer import writer_content, written_by
from duomem_mlx.runtime.prompt import prefix_messages
from duomem_mlx.teacher.base import load_tokenizer, redact, shard_arrays, teacher_memories


def parse_spec(spec: str) -> tuple[str, str]:
    """`openai:<base-url>#<model>` -> (url, model). URLs with credentials are refused: the key
    goes in OPENAI_API_KEY (an Authorization header), never in a URL that gets printed."""
    url, _, model = spec[7:].rpartition("#") if "#" in spec else (spec[7:], "", "")
    if "@" in url:
        raise DuomemError(
            f"--teacher {redact(spec)}: do not put credentials in the URL; set OPENAI_API_KEY "
            "(sent as an Authorization: Bearer header) and pass the URL without user:password@"
        )
    if not url.startswith(("http://", "https://")) or not model:
        raise DuomemError(
            f"--teacher {redact(spec)}: expected openai:<base-url>#<model>, e.g. openai:http://127.0.0.1:8080/v1#mlx-community/Qwen3-4B-4bit"
        )
    return url, model


RETRY = (408, 429, 500, 502, 503, 504)  # a busy or restarting server: try again
MAX_BODY = 32 * 2**20  # an answer of 160 tokens with 20 top logprobs each is ~100 KB
TIMEOUT_RETRIES = 1  # a timed-out request may still run on the server: try it once more, not six times


class OpenAIClient:
    """Chat completions over http.client, one client shared by every episode in flight. Every
    request has a total deadline (`timeout`, however slowly the server sends), a body size limit,
    no redirects (the Authorization header goes to the URL given and nowhere else) and strict JSON
    (no NaN or Infinity). Retries on 429, 5xx and dropped connections, after the server's
    Retry-After (with jitter) or an exponential backoff with jitter, both capped; a timeout is
    retried once and counted as abandoned (the server may still compute it). At most `max_rps`
    requests start a second. The API key (OPENAI_API_KEY) goes in a header and nowhere else."""

    def __init__(self, base_url: str, timeout: float = 120.0, retries: int = 6, max_rps: float | None = None):
        base_url = base_url.rstrip("/")
        self.base = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.timeout, self.retries = timeout, retries
        self.key = os.environ.get("OPENAI_API_KEY")
        self.pace = Pace(max_rps)
        self.lock = threading.Lock()
        self.in_flight = self.retried = self.abandoned = 0

    def request(self, path: str, body: dict | None = None, retries: int | None = None) -> dict:
        url = self.base + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode() if body is not None else None
        retries = self.retries if retries is None else retries
        timeouts = 0
        for attempt in range(retries + 1):
            wait = None
            try:
                status, reply_headers, raw = self.send(url, data, headers)
            except TimeoutError:
                timeouts += 1
                with self.lock:
                    self.abandoned += 1
                failure = Unreachable(
                    f"the teacher server at {self.base} gave no complete answer within "
                    f"{self.timeout:g} s ({attempt + 1} tries); is it overloaded?"
                )
                if timeouts > TIMEOUT_RETRIES:
                    raise failure
            except (OSError, http.client.HTTPException) as e:
                reason = f"{e.__class__.__name__}: {e}".rstrip(": ")
                failure = Unreachable(
                    f"cannot reach the teacher server at {self.base} ({reason}) after {attempt + 1} tries; "
                    "start it or fix the URL"
                )
            else:
                if 200 <= status < 300:
                    return parse_reply(url, self.base, raw)
                message = f"teacher server {url} answered HTTP {status}: {error_detail(raw.decode(errors='replace'))}"
                if 300 <= status < 400:
                    target = redact(str(reply_headers.get("Location")))
                    raise DuomemError(
                        f"teacher server {url} redirects (HTTP {status}) to {target}; requests with the "
                        "API key are never redirected: pass the final URL in --teacher"
                    )
                if status not in RETRY:
                    raise HTTPStatusError(status, message)
                failure, wait = GaveUp(f"{message} ({attempt + 1} tries)"), retry_after(reply_headers)
            if attempt == retries:
                raise failure
            with self.lock:
                self.retried += 1
            time.sleep(pause(attempt, wait))
        raise AssertionError("unreachable")

    def send(self, url: str, data: bytes | None, headers: dict) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body) of one request, whatever the status; TimeoutError once `timeout`
        seconds have passed since it started (a watchdog shuts the socket: a server that sends a
        byte a second cannot hold it longer)."""
        self.pace.wait()
        parts = urllib.parse.urlsplit(url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(parts.hostname, parts.port, timeout=self.timeout)
        expired, sockets = threading.Event(), []

        def cut() -> None:
            expired.set()
            for sock in sockets:  # the response may hold the socket after the connection let it go
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass

        watchdog = threading.Timer(self.timeout, cut)
        with self.lock:
            self.in_flight += 1
        watchdog.start()
        try:
            connection.connect()  # within `timeout` too (its own socket timeout)
            sockets.append(connection.sock)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            connection.request("POST" if data else "GET", target, data, headers)
            response = connection.getresponse()
            body = read_body(response, MAX_BODY if 200 <= response.status < 300 else 65536)
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise TimeoutError
            raise
        finally:
            watchdog.cancel()
            connection.close()
            with self.lock:
                self.in_flight -= 1
        if expired.is_set():
            raise TimeoutError
        return response.status, response.headers, body

    def chat(self, body: dict) -> dict:
        """The first choice of a chat completion, checked: {"message": {"content": ...}, ...}."""
        reply = self.request("/chat/completions", body)
        choices = reply.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            shown = " ".join(json.dumps(reply)[:160].split())
            raise DuomemError(
                f"teacher server {self.base} answered without usable choices ({shown}); "
                "is it an OpenAI-compatible chat completions API?"
            )
        content = choice["message"].get("content")
        if content is not None and not isinstance(content, str):
            raise DuomemError(
                f"teacher server {self.base} answered a non-text message content; "
                "is it an OpenAI-compatible chat completions API?"
            )
        return {**choice, "usage": reply.get("usage") if isinstance(reply.get("usage"), dict) else {}}


def read_body(response, limit: int) -> bytes:
    """The body, refused (BadReply) past `limit` bytes; error bodies are cut at `limit` instead."""
    chunks, size = [], 0
    while chunk := response.read1(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if response.status < 300:
                raise BadReply(
                    f"the teacher server answered more than {limit // 2**20} MB; is it an OpenAI-compatible API?"
                )
            break
    return b"".join(chunks)[:limit]


def parse_reply(url: str, base: str, raw: bytes) -> dict:
    """A JSON object, strictly: NaN, Infinity, numbers that overflow to inf, or nesting too deep
    for the parser are a BadReply (its episode fails), never a value in the cache; JSON that is
    not an object is another API (the run ends)."""
    try:
        reply = json.loads(raw, parse_constant=no_constant, parse_float=finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = "JSON nested too deep" if isinstance(e, RecursionError) else " ".join(str(e).split())[:120]
        raise BadReply(f"teacher server {url} did not answer valid JSON ({why}); is {base} an OpenAI-compatible API?")
    if not isinstance(reply, dict):  # another API, not a bad answer: the run ends here
        raise DuomemError(
            f"teacher server {url} answered {type(reply).__name__}, not a JSON object; "
            f"is {base} an OpenAI-compatible API?"
        )
    return reply


def no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} overflows a float")
    return value


def pause(attempt: int, retry_after: float | None) -> float:
    """Seconds before the next try: the server's Retry-After plus up to half of it (workers told the
    same do not come back in lockstep), at most a minute; else `backoff`."""
    return backoff(attempt) if retry_after is None else min(retry_after * random.uniform(1.0, 1.5), 60.0)


def backoff(attempt: int) -> float:
    """0.5, 1, 2, ... s (at most 30), each from half to one and a half of it: episodes that failed
    together do not come back together."""
    return min(0.5 * 2**attempt, 30.0) * random.uniform(0.5, 1.5)


def retry_after(headers) -> float | None:
    """The server's Retry-After in seconds (a number or an HTTP date), at most a minute."""
    value = headers.get("Retry-After") if headers else None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), 60.0) if math.isfinite(seconds) else None


class Pace:
    """At most `rps` requests start a second, across threads (None: no limit)."""

    def __init__(self, rps: float | None):
        self.gap, self.next, self.lock = 1 / rps if rps else 0.0, 0.0, threading.Lock()

    def wait(self) -> None:
        if not self.gap:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.gap
        time.sleep(start - now)


def error_detail(text: str) -> str:
    try:
        text = str(json.loads(text).get("error", text))
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(text.split())[:200]


class GaveUp(DuomemError):
    """A request that still failed after its retries (busy, failing or unreachable server): it
    fails its episode, not the run (`teach` records the reason and `--resume` plays it again)."""


class Unreachable(GaveUp):
    pass


class BadReply(GaveUp):
    """An answer that cannot be used (not strict JSON, too large, a top-logprobs row with a
    non-finite or positive logprob or an id outside the vocabulary): it fails its episode."""


class HTTPStatusError(DuomemError):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Turn:
    """One action as the server produced it: prompt length, rows of (id, logprob) pairs and
    the sampled ids when the server names them (vLLM `return_tokens_as_token_ids`)."""

    prompt_tokens: int | None
    content: str
    finish_reason: str | None
    rows: list[list[tuple[int, float]]] = field(default_factory=list)
    sampled: list[int] | None = None


class OpenAIPolicy:
    def __init__(
        self, client: OpenAIClient, model: str, top_k: int, temperature: float, max_tokens: int, vocab_size: int
    ):
        self.client, self.model, self.top_k, self.vocab_size = client, model, top_k, vocab_size
        self.temperature, self.max_tokens = temperature, max_tokens
        self.turns: list[Turn] = []

    def start(self, env, spec, task_description, first):
        self.messages = prefix_messages(task_description, first.observation)
        self.turns = []

    def act(self, state) -> str:
        if self.turns:
            self.messages.append({"role": "user", "content": state.observation.strip()})
        # thinking off, as the shards are tokenized (Qwen3's template; vLLM and mlx_lm.server pass it on)
        body = {
            "model": self.model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "chat_template_kwargs": {"enable_thinking": False},
        }
        if self.top_k:
            body.update(logprobs=True, top_logprobs=self.top_k, return_tokens_as_token_ids=True)
        try:
            choice = self.client.chat(body)
        except HTTPStatusError as e:
            if self.top_k and e.code in (400, 422) and "logprob" in str(e).lower():
                raise DuomemError(
                    f"{e}; lower --top-k (mlx_lm.server allows <= 10, vLLM <= 20) "
                    "or pass --top-k 0 for trajectories only"
                )
            if e.code == 404:
                raise DuomemError(f"{e}; check the model name after '#' in --teacher ({self.model})")
            raise
        content = choice["message"].get("content") or ""
        turn = Turn(choice["usage"].get("prompt_tokens"), content, choice.get("finish_reason"))
        if self.top_k:
            logprobs = choice.get("logprobs")
            entries = logprobs.get("content") if isinstance(logprobs, dict) else None
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
                raise DuomemError(
                    f"the teacher server at {self.client.base} returned no logprobs; use one that supports "
                    "top_logprobs (vLLM, mlx_lm.server) or --top-k 0"
                )
            turn.rows = [top_row(e.get("top_logprobs", []), self.vocab_size) for e in entries]
            sampled = [token_id(e.get("token")) for e in entries]
            if all(t is not None for t in sampled):
                turn.sampled = sampled
        self.turns.append(turn)
        action = content.strip().split("\n")[0].strip()
        self.messages.append({"role": "assistant", "content": action})
        return action


def top_row(entries, vocab_size: int) -> list[tuple[int, float]]:
    """One position's (id, logprob) pairs, most likely first; BadReply (the episode fails, not the
    run) unless every logprob is finite and at most 0 and every id is in the vocabulary."""
    if not isinstance(entries, list) or not all(isinstance(t, dict) for t in entries):
        raise BadReply("the teacher server returned malformed top_logprobs (not a list of objects)")
    row = []
    for t in entries:
        token, logprob = entry_id(t), t.get("logprob")
        if not 0 <= token < vocab_size:
            raise BadReply(
                f"the teacher server returned top_logprobs id {token}, outside the vocabulary "
                f"[0, {vocab_size}); is --teacher-tokenizer the served model's tokenizer?"
            )
        if not isinstance(logprob, (int, float)) or isinstance(logprob, bool) or not -math.inf < logprob <= 1e-3:
            raise BadReply(
                f"the teacher server returned a logprob of {str(logprob)[:20]}; a logprob is a finite number <= 0"
            )
        row.append((token, min(float(logprob), 0.0)))  # a rounding error's +1e-6 is 0
    return sorted(row, key=lambda p: -p[1])


def token_id(token) -> int | None:
    """N of a vLLM `token_id:N` token, or None."""
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].isdigit() and len(token) < 30:
        return int(token[9:])
    return None


def entry_id(entry: dict) -> int:
    if isinstance(entry.get("id"), int) and not isinstance(entry["id"], bool):
        return entry["id"]
    token = token_id(entry.get("token"))
    if token is not None:
        return token
    if isinstance(entry.get("token"), str) and entry["token"].startswith("token_id:"):
        raise BadReply(f"the teacher server returned a malformed token id {entry['token'][:30]!r}")
    raise DuomemError(
        "the teacher server returns top_logprobs without token ids; "
        "start vLLM with --return-tokens-as-token-ids or use mlx_lm.server"
    )


class OpenAITeacher:
    backend = "openai"

    def __init__(
        self,
        url: str,
        model: str,
        top_k: int,
        temperature: float,
        tokenizer: str | None,
        max_tokens: int,
        max_rps: float | None = None,
    ):
        self.spec, self.top_k = f"openai:{url}#{model}", top_k
        self.client = OpenAIClient(url, max_rps=max_rps)
        self.model = model
        self.check_model()
        if tokenizer is None and not Path(model).expanduser().is_dir():
            raise DuomemError(
                f"the served model {model} is not a local directory; "
                "pass --teacher-tokenizer with its tokenizer (a local dir or Hub repo)"
            )
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.vocab_size = len(self.tokenizer.get_vocab())
        self.policy = OpenAIPolicy(self.client, model, top_k, temperature, max_tokens, self.vocab_size)

    def check_model(self):
        try:
            listing = self.client.request("/models", retries=1)
        except Unreachable:
            raise
        except DuomemError:
            return  # no usable /models (mlx_lm.server offline): the first completion names any problem
        data = listing.get("data")
        served = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        if served and self.model not in served:
            raise DuomemError(
                f"the teacher server at {self.client.base} does not serve {self.model!r}; it serves: "
                f"{', '.join(map(str, served[:8]))}"
            )

    def arrays(self, episode):
        arrays = shard_arrays(self.tokenizer, episode)
        if self.top_k:
            eos = set(getattr(self.tokenizer, "eos_token_ids", None) or [self.tokenizer.eos_token_id])
            turns, greedy = self.policy.turns, self.policy.temperature == 0
            arrays.update(
                align_turns(self.tokenizer, arrays["input_ids"], arrays["loss_mask"], turns, self.top_k, eos, greedy)
            )
        return arrays

    def memories(self, episodes, writer: str, kind: str = "script") -> list:
        return teacher_memories(self.write_memories, episodes, writer, kind)

    def write_memories(self, episodes):
        def reply(episode) -> str:
            body = {
                "model": self.model,
                "messages": [{"role": "user", "content": writer_content(episode)}],
                "max_tokens": 160,
                "temperature": 0.0,
            }
            return self.client.chat(body)["message"].get("content") or ""

        return written_by(episodes, reply)


def align_turns(
    tokenizer, input_ids, loss_mask, turns: list[Turn], k: int, eos: set[int], greedy: bool
) -> dict[str, np.ndarray]:
    """Top-k rows for the masked tokens from the server's per-token top_logprobs.

    Row j of an action is exact when the server had generated the same j tokens before it
    (its prompt had the local length, and its first j tokens equal the local ones); every
    other row is marked unaligned (ids -1, logprob 0) and counted, never shifted."""
    starts = np.flatnonzero(np.diff(np.concatenate([[0], loss_mask])) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate([loss_mask, [0]])) == -1) + 1
    if len(starts) != len(turns):
        raise DuomemError(f"internal: {len(starts)} actions in the chat but {len(turns)} server replies")
    ids = np.full((int(loss_mask.sum()), k), -1, np.int32)
    lps = np.zeros((int(loss_mask.sum()), k), np.float16)
    row = 0
    for start, end, turn in zip(starts, ends, turns):
        local = [int(t) for t in input_ids[start:end]]
        valid = 0
        if turn.prompt_tokens in (None, start):
            generated = turn.sampled if turn.sampled is not None else generated_from_text(tokenizer, turn, greedy)
            valid = min(len(turn.rows), len(local), 1 + common_prefix(local, generated, eos))
        for j in range(valid):
            pairs = turn.rows[j][:k]
            ids[row + j, : len(pairs)] = [p[0] for p in pairs]
            lps[row + j, : len(pairs)] = [max(p[1], -65000.0) for p in pairs]
        row += end - start
    return {"topk_ids": ids, "topk_logprobs": lps}


def generated_from_text(tokenizer, turn: Turn, greedy: bool) -> list[int]:
    """The server's tokens when it does not name them (mlx_lm.server): the local tokenization
    of its text (+ end of turn), kept while each token is the argmax of its row (greedy) or
    among its top-k (sampling), and only when the count matches the rows returned."""
    tokens = list(tokenizer.encode(turn.content, add_special_tokens=False))
    if turn.finish_reason == "stop" and len(turn.rows) == len(tokens) + 1:
        tokens.append(-2)  # some end-of-turn token
    if len(turn.rows) != len(tokens):
        return []
    for j, (token, row) in enumerate(zip(tokens, turn.rows)):
        ids = [row[0][0]] if greedy else [p[0] for p in row]
        if token != -2 and token not in ids:
            return tokens[:j]
    return tokens


def common_prefix(local: list[int], generated: list[int], eos: set[int]) -> int:
    n = 0
    for a, g in zip(local, generated):
        if a != g and not (g == -2 and a in eos):
            break
        n += 1
    return n
