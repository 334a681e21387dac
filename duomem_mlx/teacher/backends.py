"""Teacher backends, chosen by `--teacher`:

    mlx:<repo-or-path>            an mlx-lm model in-process; top-k from one forward pass (exact)
    openai:<base-url>#<model>     an OpenAI-compatible server; top-k from top_logprobs
    oracle                        the environment's gold path; no logits

Each teacher has a `policy` (plays episodes), `tokenizer` (or None), `vocab_size`, `top_k`,
`arrays(episode)` (the shard of one played episode) and `memories(episodes, writer)`.
"""

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..agent.prompt import episode_messages, prefix_messages, tokenize_with_mask
from ..errors import DuomemError


def make_teacher(spec: str, top_k: int = 20, temperature: float = 0.0, tokenizer: str | None = None,
                 decode: str = "constrained", max_context: int = 4096, seed: int = 0, max_tokens: int = 64):
    if spec == "oracle":
        return OracleTeacher(tokenizer)
    if spec.startswith("mlx:"):
        return MLXTeacher(spec[4:], top_k, temperature, decode, max_context, seed)
    if spec.startswith("openai:"):
        url, _, model = spec[7:].partition("#")
        if not url.startswith(("http://", "https://")) or not model:
            raise DuomemError(f"--teacher {spec}: expected openai:<base-url>#<model>, e.g. openai:http://127.0.0.1:8080/v1#mlx-community/Qwen3-4B-4bit")
        return OpenAITeacher(url, model, top_k, temperature, tokenizer, max_tokens)
    raise DuomemError(f"unknown --teacher {spec}; use mlx:<path-or-repo>, openai:<base-url>#<model> or oracle")


def shard_arrays(tokenizer, episode) -> dict[str, np.ndarray]:
    """input_ids / loss_mask of the chat the teacher saw while playing `episode`."""
    ids, mask = tokenize_with_mask(tokenizer, episode_messages(episode))
    return {"input_ids": np.array(ids, dtype=np.int32), "loss_mask": np.array(mask, dtype=np.uint8)}


def load_tokenizer(path: str):
    """An mlx-lm TokenizerWrapper from a local model dir, or a Hub repo (tokenizer files only)."""
    from mlx_lm.tokenizer_utils import load as load_wrapper

    local = Path(path).expanduser()
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(path, allow_patterns=["*.json", "*.jinja", "*.model", "*.txt"]))
        except Exception as e:  # offline, unknown repo, gated: all say the same thing to the user
            raise DuomemError(f"cannot get the teacher tokenizer {path} ({e.__class__.__name__}); pass --teacher-tokenizer LOCAL_DIR")
    if not (local / "tokenizer.json").exists() and not (local / "tokenizer_config.json").exists():
        raise DuomemError(f"{local} holds no tokenizer; pass --teacher-tokenizer with the served model's directory")
    return load_wrapper(local)


def teacher_memories(policy_memories, episodes, writer: str) -> list:
    from ..memory.writer import rule_memories

    if writer == "rules":
        return rule_memories(episodes)
    return policy_memories(episodes)


class OracleTeacher:
    """The environment's expert; with a tokenizer (the student's) shards hold the tokenized
    chats for cross-entropy, never top-k."""

    backend, top_k = "oracle", 0

    def __init__(self, tokenizer_path: str | None):
        from ..envs.policies import OraclePolicy

        self.spec = "oracle"
        self.policy = OraclePolicy()
        self.tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        self.vocab_size = len(self.tokenizer.get_vocab()) if self.tokenizer else None

    def arrays(self, episode):
        return shard_arrays(self.tokenizer, episode) if self.tokenizer else None

    def memories(self, episodes, writer: str) -> list:
        if writer != "rules":
            raise DuomemError("the oracle teacher writes no text; use --memory-writer rules")
        return teacher_memories(None, episodes, writer)


class MLXTeacher:
    """Plays through a TopKRecorder wrapped around the model, so the top-k rows come from the
    logits the teacher computed anyway while playing; only tokens it never fed (the tail of
    its last action) or fed in another context (turns dropped from a full window) are run
    through the model again."""

    backend = "mlx"

    def __init__(self, path: str, top_k: int, temperature: float, decode: str, max_context: int, seed: int):
        import mlx.core as mx

        from ..agent.loop import ModelPolicy
        from ..models import load

        self.spec, self.top_k = f"mlx:{path}", top_k
        self.model, self.tokenizer = load(path)
        self.vocab_size = self.model(mx.array([[0]])).shape[-1]
        mx.random.seed(seed)
        self.recorder = TopKRecorder(self.model, top_k, set(self.tokenizer.eos_token_ids)) if top_k else self.model
        self.policy = ModelPolicy(self.recorder, self.tokenizer, decode=decode, max_context=max_context, temperature=temperature)

    def arrays(self, episode):
        arrays = shard_arrays(self.tokenizer, episode)
        if self.top_k:
            arrays.update(self.recorder.rows_for(arrays["input_ids"], arrays["loss_mask"], self.policy.session.cache))
        return arrays

    def memories(self, episodes, writer: str) -> list:
        from ..memory.writer import model_memories

        return teacher_memories(lambda eps: model_memories(eps, self.model, self.tokenizer), episodes, writer)


def topk_logprobs(logits, k: int):
    """(ids, logprobs) [n, k] of log-softmax(logits [n, V]) at temperature 1, most likely first."""
    import mlx.core as mx

    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    top = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logprobs, top, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(top, order, axis=-1).astype(mx.int32), mx.take_along_axis(values, order, axis=-1).astype(mx.float16)


def feed_topk(model, tokens, cache, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Feed `tokens` into `cache`; the top-k rows at each of their positions."""
    import mlx.core as mx

    ids, lps = [np.zeros((0, k), np.int32)], [np.zeros((0, k), np.float16)]
    for start in range(0, len(tokens), chunk):
        top, values = topk_logprobs(model(mx.array(tokens[start : start + chunk])[None], cache=cache)[0], k)
        mx.eval(top, values)
        ids.append(np.array(top))
        lps.append(np.array(values))
    return np.concatenate(ids), np.concatenate(lps)


def forward_topk(model, input_ids, loss_mask, k: int, chunk: int = 512) -> dict[str, np.ndarray]:
    """Row i: the k most likely next tokens (log-softmax, temperature 1, unprocessed) at the
    position before the i-th masked token, from one chunked forward pass."""
    from mlx_lm.models.cache import make_prompt_cache

    positions = masked_positions(loss_mask)
    ids, lps = feed_topk(model, input_ids[: positions[-1] + 1 if len(positions) else 0], make_prompt_cache(model), k, chunk)
    return {"topk_ids": ids[positions], "topk_logprobs": lps[positions]}


def masked_positions(loss_mask) -> np.ndarray:
    """Positions whose logits predict a masked token: the one before each."""
    positions = np.flatnonzero(loss_mask) - 1
    if len(positions) and positions[0] < 0:
        raise DuomemError("the first token of an episode is masked; the chat has no prompt before the first action")
    return positions


class TopKRecorder:
    """Wraps an mlx-lm model for a playing teacher. It remembers the tokens its KV cache holds
    and the top-k of the log-softmax at the positions whose logits generation computes anyway
    (every single-token call: the decoder, the last prompt token), plus, when a prompt starts
    with the rest of an action the decoder did not feed (constrained decoding completes a
    command once it is unique), the positions of that rest. Logits over observations are
    never computed."""

    def __init__(self, model, k: int, eos: set[int]):
        self.model, self.k, self.eos = model, k, eos
        self.tokens: list[tuple] = []  # (start, tokens), contiguous from 0
        self.rows: list[tuple] = []  # (positions, ids, logprobs)
        self.decoded: list[tuple] = []  # (position, token) of single-token calls since the last prompt
        self.logits: list[tuple] = []  # (positions, logits) not yet reduced to top-k
        self.refed = 0  # positions the last rows_for() call had to run again

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, **kwargs):
        import mlx.core as mx

        start = cache[0].offset if cache else 0
        self.forget(start)
        logits = self.model(inputs, cache=cache, **kwargs)
        self.tokens.append((start, inputs[0]))
        n = inputs.shape[1]
        record = n if n == 1 else self.unfinished_action(inputs, start)
        self.decoded = self.decoded + [(start, inputs[0, 0])] if n == 1 else []
        if record:
            self.logits.append((start + np.arange(record), logits[0, :record]))
            if n > 1:  # evaluated with this prompt's forward pass, not replayed later
                mx.async_eval(self.logits[-1][1])
            if len(self.logits) >= 64:
                self.flush()
        return logits

    def forget(self, start: int):
        """Drop what lies at or after `start`: the cache was trimmed back there."""
        while self.tokens and self.tokens[-1][0] + self.tokens[-1][1].shape[0] > start:
            s, t = self.tokens.pop()
            if s < start:
                self.tokens.append((s, t[: start - s]))
        for rows in (self.rows, self.logits):
            while rows and rows[-1][0][-1] >= start:
                positions, *arrays = rows.pop()
                keep = int((positions < start).sum())
                if keep:
                    rows.append((positions[:keep], *(a[:keep] for a in arrays)))

    def flush(self):
        """Top-k of the logits kept so far, in one batch (few ops per row matter when decoding)."""
        import mlx.core as mx

        if self.logits:
            positions = np.concatenate([p for p, _ in self.logits])
            top, values = topk_logprobs(mx.concatenate([l for _, l in self.logits]), self.k)
            mx.async_eval(top, values)
            self.rows.append((positions, top, values))
            self.logits = []

    def unfinished_action(self, inputs, start) -> int:
        """How many leading prompt tokens still predict the current action (up to its end of turn)."""
        decoded = [int(t) for p, t in self.decoded if p < start]
        if not decoded or any(t in self.eos for t in decoded):
            return 0
        chunk = np.array(inputs[0]).tolist()
        return next((j for j, t in enumerate(chunk) if t in self.eos), 0)

    def recorded(self) -> tuple[np.ndarray, dict]:
        """(tokens the cache holds, {position: (ids, logprobs)} for the recorded positions)."""
        self.flush()
        tokens = [np.array(t) for _, t in self.tokens]
        rows = {}
        for positions, ids, values in self.rows:
            rows.update(zip(positions.tolist(), zip(np.array(ids), np.array(values))))
        return np.concatenate(tokens) if tokens else np.zeros(0, np.int64), rows

    def rows_for(self, input_ids, loss_mask, cache) -> dict[str, np.ndarray]:
        """Top-k rows of an episode: recorded where the fed tokens equal `input_ids`; missing
        runs fed again on a copy of `cache` cut at their start (from scratch when it cannot be)."""
        positions = masked_positions(loss_mask)
        need = int(positions[-1]) + 1 if len(positions) else 0
        tokens, rows = self.recorded()
        same = next((j for j, (a, b) in enumerate(zip(tokens[:need], input_ids[:need])) if a != b), min(len(tokens), need))
        missing = [int(p) for p in positions if p >= same or p not in rows]
        self.refed = 0
        for a, b in runs(missing, same, need):
            tail, a = cut_cache(cache, a, self.model)
            ids, lps = feed_topk(self.model, input_ids[a:b], tail, self.k)
            rows.update(zip(range(a, b), zip(ids, lps)))
            self.refed += b - a
        return {
            "topk_ids": np.array([rows[p][0] for p in positions], np.int32).reshape(-1, self.k),
            "topk_logprobs": np.array([rows[p][1] for p in positions], np.float16).reshape(-1, self.k),
        }


def runs(missing: list[int], same: int, need: int) -> list[tuple[int, int]]:
    """Half-open ranges to feed again: each run of consecutive missing positions before
    `same`, and one range from `same` to `need` (where the fed tokens parted)."""
    out = []
    for p in sorted(set(q for q in missing if q < same)):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    if same < need:
        out.append([same, need])
    return [tuple(r) for r in out]


def cut_cache(cache, at: int, model):
    """A copy of a plain KV cache holding its first `at` positions; or a fresh cache (at = 0)."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    if at and all(type(c) is KVCache and c.offset >= at for c in cache):
        copy = [KVCache() for _ in cache]
        for new, old in zip(copy, cache):
            new.state = (old.keys[..., :at, :], old.values[..., :at, :], at)
        return copy, at
    return make_prompt_cache(model), 0


class OpenAIClient:
    """Chat completions over urllib: timeouts, retries with exponential backoff on connection
    errors, 429 and 5xx. The API key (OPENAI_API_KEY) goes in a header and nowhere else."""

    def __init__(self, base_url: str, timeout: float = 120.0, retries: int = 4):
        base_url = base_url.rstrip("/")
        self.base = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.timeout, self.retries = timeout, retries
        self.key = os.environ.get("OPENAI_API_KEY")

    def request(self, path: str, body: dict | None = None, retries: int | None = None) -> dict:
        url = self.base + path
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode() if body is not None else None
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
                with urllib.request.urlopen(req, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = error_detail(e.read().decode(errors="replace"))
                if e.code in (429, 500, 502, 503, 504) and attempt < retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise HTTPStatusError(e.code, f"teacher server {url} answered HTTP {e.code}: {detail or e.reason}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt < retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                reason = getattr(e, "reason", e)
                raise Unreachable(f"cannot reach the teacher server at {self.base} ({reason}) after {retries + 1} tries; start it or fix the URL")
            except json.JSONDecodeError:
                raise DuomemError(f"teacher server {url} did not answer JSON; is {self.base} an OpenAI-compatible API?")
        raise AssertionError("unreachable")


def error_detail(text: str) -> str:
    try:
        text = str(json.loads(text).get("error", text))
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(text.split())[:200]


class Unreachable(DuomemError):
    pass


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
    def __init__(self, client: OpenAIClient, model: str, top_k: int, temperature: float, max_tokens: int):
        self.client, self.model, self.top_k = client, model, top_k
        self.temperature, self.max_tokens = temperature, max_tokens
        self.turns: list[Turn] = []

    def start(self, env, spec, task_description, first):
        self.messages = prefix_messages(task_description, first.observation)
        self.turns = []

    def act(self, state) -> str:
        if self.turns:
            self.messages.append({"role": "user", "content": state.observation.strip()})
        body = {"model": self.model, "messages": self.messages, "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.top_k:
            body.update(logprobs=True, top_logprobs=self.top_k, return_tokens_as_token_ids=True)
        try:
            reply = self.client.request("/chat/completions", body)
        except HTTPStatusError as e:
            if self.top_k and e.code in (400, 422) and "logprob" in str(e).lower():
                raise DuomemError(f"{e}; lower --top-k (mlx_lm.server allows <= 10, vLLM <= 20) or pass --top-k 0 for trajectories only")
            if e.code == 404:
                raise DuomemError(f"{e}; check the model name after '#' in --teacher ({self.model})")
            raise
        choice = reply["choices"][0]
        content = choice["message"].get("content") or ""
        turn = Turn(reply.get("usage", {}).get("prompt_tokens"), content, choice.get("finish_reason"))
        if self.top_k:
            entries = (choice.get("logprobs") or {}).get("content")
            if not entries:
                raise DuomemError(f"the teacher server at {self.client.base} returned no logprobs; use one that supports top_logprobs (vLLM, mlx_lm.server) or --top-k 0")
            turn.rows = [sorted(((entry_id(t), t["logprob"]) for t in e.get("top_logprobs", [])), key=lambda p: -p[1]) for e in entries]
            sampled = [e.get("token", "") for e in entries]
            if all(isinstance(s, str) and s.startswith("token_id:") for s in sampled):
                turn.sampled = [int(s[9:]) for s in sampled]
        self.turns.append(turn)
        action = content.strip().split("\n")[0].strip()
        self.messages.append({"role": "assistant", "content": action})
        return action


def entry_id(entry: dict) -> int:
    if isinstance(entry.get("id"), int):
        return entry["id"]
    token = entry.get("token", "")
    if isinstance(token, str) and token.startswith("token_id:"):
        return int(token[9:])
    raise DuomemError("the teacher server returns top_logprobs without token ids; start vLLM with --return-tokens-as-token-ids or use mlx_lm.server")


class OpenAITeacher:
    backend = "openai"

    def __init__(self, url: str, model: str, top_k: int, temperature: float, tokenizer: str | None, max_tokens: int):
        self.spec, self.top_k = f"openai:{strip_userinfo(url)}#{model}", top_k
        self.client = OpenAIClient(url)
        self.model = model
        self.check_model()
        if tokenizer is None and not Path(model).expanduser().is_dir():
            raise DuomemError(f"the served model {model} is not a local directory; pass --teacher-tokenizer with its tokenizer (a local dir or Hub repo)")
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.vocab_size = len(self.tokenizer.get_vocab())
        self.policy = OpenAIPolicy(self.client, model, top_k, temperature, max_tokens)

    def check_model(self):
        try:
            listing = self.client.request("/models", retries=1)
        except Unreachable:
            raise
        except DuomemError:
            return  # no usable /models (mlx_lm.server offline): the first completion names any problem
        served = [m.get("id") for m in listing.get("data", [])]
        if served and self.model not in served:
            raise DuomemError(f"the teacher server at {self.client.base} does not serve {self.model!r}; it serves: {', '.join(map(str, served[:8]))}")

    def arrays(self, episode):
        arrays = shard_arrays(self.tokenizer, episode)
        if self.top_k:
            eos = set(getattr(self.tokenizer, "eos_token_ids", None) or [self.tokenizer.eos_token_id])
            turns, greedy = self.policy.turns, self.policy.temperature == 0
            arrays.update(align_turns(self.tokenizer, arrays["input_ids"], arrays["loss_mask"], turns, self.top_k, eos, greedy))
        return arrays

    def memories(self, episodes, writer: str) -> list:
        return teacher_memories(self.write_memories, episodes, writer)

    def write_memories(self, episodes) -> list:
        from ..memory.bank import Memory, memory_id
        from ..memory.writer import WRITER_PROMPT, clean_reply, successful, trajectory_text

        memories = []
        for episode in successful(episodes):
            prompt = WRITER_PROMPT.format(task=episode.task_description.strip(), trajectory=trajectory_text(episode))
            body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 160, "temperature": 0.0}
            reply = clean_reply(self.client.request("/chat/completions", body)["choices"][0]["message"].get("content") or "")
            if reply:
                memories.append(Memory(memory_id(episode.task + reply), episode.task, reply, [episode.id]))
        return memories


def strip_userinfo(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl() if parts.username else url


def align_turns(tokenizer, input_ids, loss_mask, turns: list[Turn], k: int, eos: set[int], greedy: bool) -> dict[str, np.ndarray]:
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
