"""A loopback OpenAI-compatible chat server with a fixed policy: what a remote GPU server looks like
from here, for benchmarks/teacher_concurrency.py and the tests.

It answers each chat with the gold path of the game whose first observation opens it (a table the
caller writes with `gold_table`; `look` past its end), after a fixed latency, with vLLM-style
top_logprobs (`token_id:N`) for the tokens of its answer and the end of turn, so the same chat
always gets the same bytes. It can fail a share of chat requests (429 with Retry-After, 503, or a
connection dropped without an answer), and every request of the first `--broken` games (503).

    python benchmarks/policy_server.py --gold gold.json --tokenizer MODEL_DIR --latency 0.2 --faults 0.2
    (prints the port it listens on, on 127.0.0.1)
"""

import argparse
import json
import random
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tokenizers import Tokenizer

from duomem_mlx.runtime.prompt import prefix_messages

FAULTS = ("429", "503", "drop")


def gold_table(env, specs) -> dict[str, list[str]]:
    """First user message of each spec's chat (as the openai: teacher writes it) -> the gold path."""
    table = {}
    for spec in specs:
        task, first = env.reset(spec)
        table.setdefault(prefix_messages(task, first.observation)[1]["content"], env.expert_actions())
    return table


@contextmanager
def running(
    gold: dict, model_dir, tmp, latency: float = 0.2, faults: float = 0.0, broken: int = 0, seed: int = 0, port: int = 0
):
    """The server in its own process (its own interpreter, as a remote server is); yields its /v1 URL.
    `port` 0 takes a free one; another server's port is its restart (the URL a cache was collected from)."""
    path = Path(tmp) / "gold.json"
    path.write_text(json.dumps(gold))
    argv = [
        sys.executable,
        __file__,
        "--gold",
        str(path),
        "--tokenizer",
        str(model_dir),
        "--latency",
        str(latency),
        "--faults",
        str(faults),
        "--broken",
        str(broken),
        "--seed",
        str(seed),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}/v1"
    finally:
        proc.kill()
        proc.wait()


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats", timeout=10) as response:
        return json.loads(response.read())


class Policy:
    def __init__(self, gold: dict, tokenizer_dir: str, latency: float, faults: float, broken: int, seed: int):
        self.gold, self.latency, self.faults, self.broken = gold, latency, faults, set(list(gold)[:broken])
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        eos = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())["eos_token"]
        self.eos = self.tokenizer.token_to_id(eos if isinstance(eos, str) else eos["content"])
        self.vocab = self.tokenizer.get_vocab_size()
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.counts = {"requests": 0, **{f: 0 for f in FAULTS}}

    def fault(self, body: dict) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            kind = self.rng.choice(FAULTS) if self.rng.random() < self.faults else None
            kind = "503" if first_message(body) in self.broken else kind
            if kind:
                self.counts[kind] += 1
        return kind

    def answer(self, body: dict) -> dict:
        plan = self.gold.get(first_message(body), [])
        step = sum(m["role"] == "assistant" for m in body["messages"])
        action = plan[step] if step < len(plan) else "look"
        choice = {"index": 0, "message": {"role": "assistant", "content": action}, "finish_reason": "stop"}
        k = body.get("top_logprobs") if body.get("logprobs") else 0
        if k:
            tokens = self.tokenizer.encode(action, add_special_tokens=False).ids + [self.eos]
            choice["logprobs"] = {"content": [self.row(t, k) for t in tokens]}
        return {"object": "chat.completion", "model": body.get("model"), "choices": [choice], "usage": {}}

    def row(self, token: int, k: int) -> dict:
        top = [{"token": f"token_id:{token}", "logprob": -0.01}]
        top += [{"token": f"token_id:{(token + j) % self.vocab}", "logprob": -2.0 - j} for j in range(1, k)]
        return {"token": f"token_id:{token}", "logprob": -0.01, "top_logprobs": top}


def first_message(body: dict) -> str | None:
    messages = body.get("messages", [])
    return messages[1]["content"] if len(messages) > 1 else None


def handler(policy: Policy):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def reply(self, code: int, data: dict, headers: dict | None = None):
            raw = json.dumps(data).encode()
            self.send_response(code)
            for name, value in {
                "Content-Type": "application/json",
                "Content-Length": str(len(raw)),
                **(headers or {}),
            }.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            if self.path.endswith("/stats"):  # requests and faults so far
                return self.reply(200, policy.counts)
            self.reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fault = policy.fault(body)
            if fault == "drop":
                self.close_connection = True  # no answer at all: the client sees the connection close
                return
            if fault:
                retry = {"Retry-After": "1"} if fault == "429" else {}
                return self.reply(int(fault), {"error": {"message": f"injected {fault}"}}, retry)
            time.sleep(policy.latency)
            self.reply(200, policy.answer(body))

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # every episode in flight may connect at once

    def handle_error(self, request, client_address):
        pass  # a client killed mid-request (the kill -9 run): nothing to tell


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gold", required=True, help="JSON written from gold_table")
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="model dir whose tokenizer.json names the token ids (also the served model's name)",
    )
    parser.add_argument("--latency", type=float, default=0.2, help="seconds before each answer")
    parser.add_argument(
        "--faults", type=float, default=0.0, help="share of chat requests that fail (429 / 503 / dropped)"
    )
    parser.add_argument("--broken", type=int, default=0, help="the first N games of the table fail every request (503)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    args = parser.parse_args()
    policy = Policy(
        json.loads(Path(args.gold).read_text()), args.tokenizer, args.latency, args.faults, args.broken, args.seed
    )
    server = Server(("127.0.0.1", args.port), handler(policy))
    server.models = [args.tokenizer]
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
