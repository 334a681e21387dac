"""Bad input, bad destinations and the house rules, as a user meets them: one `Error:` line,
exit code != 0, no traceback, nothing half-written (real files, real models, real envs)."""

import ast
import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from huggingface_hub.utils import HFValidationError, validate_repo_id

import duomem_mlx
from duomem_mlx.cli import cli
from duomem_mlx.deploy.hub import check_repo_id
from duomem_mlx.envs.base import Episode, play_episode
from duomem_mlx.envs.policies import OraclePolicy
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats.bank import MemoryBank
from duomem_mlx.formats.teacher_cache import CacheWriter, read_cache_records, verify
from duomem_mlx.runtime import models
from duomem_mlx.runtime.embed import build
from duomem_mlx.runtime.models import load

MEMORIES = [
    {"id": "m1", "task_type": "simple", "text": "open the chest, take the key, unlock the door"},
    {"id": "m2", "task_type": "melt", "text": "focus on the ice, move it to the stove, activate the stove, wait"},
]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result) -> str:
    """The one line a user sees when something is wrong."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bank_dir(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("bank") / "bank"
    build(MEMORIES, *load(str(tiny_model)), embedder=str(tiny_model)).save(path)
    return path


# ---------------------------------------------------------------- the house


def test_library_errors_need_no_click_and_reach_users_as_one_line():
    assert not issubclass(DuomemError, click.ClickException)
    group = click.Group("late-subgroup")  # as another engineer adds one: plain click, plain DuomemError

    @group.command("boom")
    def boom():
        """Fail."""
        raise DuomemError("the thing is broken; fix it with --this")

    cli.add_command(group)
    try:
        assert error_line(run("late-subgroup", "boom")) == "Error: the thing is broken; fix it with --this"
    finally:
        cli.commands.pop("late-subgroup")


# ---------------------------------------------------------------- layers, read from the source

ROOT = Path(__file__).resolve().parent.parent / "duomem_mlx"
LAYERS = "base cpu envs formats runtime convert memory teacher distill deploy agent top".split()  # lowest first
BASE = {"errors", "io", "config", "progress", "version"}
TOP = {"cli", "api", "__init__", "__main__"}
APART = {"duomem_mlx.teacher.openai_compat": "duomem_mlx.teacher.backends"}  # backends makes it: a cycle


def layer_of(module: str) -> str | None:
    """`pkg.runtime.models` -> runtime, `pkg.io` -> base, `pkg` (its __init__) -> top; None: no layer."""
    first = (module.split(".")[1:] or ["__init__"])[0]
    return "base" if first in BASE else "top" if first in TOP else first if first in LAYERS else None


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module of `root`'s package that `path` imports, at any depth (function-level too),
    absolute or relative; `from pkg.sub import name` is pkg.sub.name where that is a module."""
    package, name = root.name, module_name(path, root)
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            start = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".")
            base = start if node.level else node.module
            for alias in node.names:
                sub = root.parent.joinpath(*f"{base}.{alias.name}".split("."))
                found.add(f"{base}.{alias.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else base)
    return {m for m in found if m == package or m.startswith(package + ".")}


def all_imports(root: Path) -> dict[str, set[str]]:
    return {module_name(path, root): imports_of(path, root) for path in sorted(root.rglob("*.py"))}


def upward_arrows(root: Path) -> list[str]:
    """`module -> imported (layer a -> layer b)` for every import of a higher layer (or of no layer)."""
    arrows = []
    for module, imported in all_imports(root).items():
        for target in sorted(imported):
            a, b = layer_of(module), layer_of(target)
            if a is None or b is None or LAYERS.index(b) > LAYERS.index(a):
                arrows.append(f"{module} -> {target} ({a} -> {b})")
    return arrows


def third_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level and n.module]
    return {name.split(".")[0] for name in names}


def test_every_import_points_to_its_own_layer_or_a_lower_one():
    arrows = upward_arrows(ROOT)
    assert not arrows, "upward imports:\n" + "\n".join(arrows)
    for module, imported in all_imports(ROOT).items():
        assert APART.get(module) not in imported, module
        if layer_of(module) == "formats":  # pure readers and writers: base, the Episode type, third-party libraries
            below = {m for m in imported if layer_of(m) not in ("formats", "base")}
            assert below <= {"duomem_mlx.envs.base"}, f"{module} imports {below}"


def may_use_click(module: str) -> bool:
    """The commands: every cli.py; config.py (the option types and config-file defaults they share); agent/ (eval
    and chat are the commands' own bodies: chat prompts and colours the terminal). Library code raises DuomemError."""
    return module.endswith(".cli") or module == "duomem_mlx.config" or layer_of(module) == "agent"


def test_click_only_where_commands_are_made_and_io_needs_neither_click_nor_mlx():
    with_click = {module_name(p, ROOT) for p in ROOT.rglob("*.py") if "click" in third_party_imports(p)}
    new = sorted(m for m in with_click if not may_use_click(m))
    assert not new, f"click in library modules: {new}"
    assert not {"click", "mlx", "mlx_lm"} & third_party_imports(ROOT / "io.py")


def test_the_cli_starts_without_mlx():
    """Every command's options (the formats' KINDS and KEYS, the runtime's PolicyOptions) load without mlx."""
    code = "import sys, duomem_mlx.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'mlx_lm'}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_layer_check_sees_a_hidden_function_level_import(tmp_path):
    root = tmp_path / "pkg"
    for name, text in {
        "__init__.py": "",
        "io.py": "import json\n",
        "cli.py": "",
        "envs/__init__.py": "from . import base\n",
        "envs/base.py": "from ..io import json\n\n\ndef play():\n    from pkg.runtime.models import load\n",
        "runtime/__init__.py": "",
        "runtime/models.py": "from pkg import io\nfrom ..envs.base import play\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert upward_arrows(root) == ["pkg.envs.base -> pkg.runtime.models (envs -> runtime)"]
    (root / "envs" / "base.py").write_text("def play():\n    from .. import cli\n")
    assert upward_arrows(root) == ["pkg.envs.base -> pkg.cli (envs -> top)"]


@pytest.mark.parametrize("name", ["org/model-1.0", "a--b/c", "a/b.git", "a/..b", "x" * 97 + "/y", "-a/b", "a/b/c"])
def test_one_repo_id_rule_for_loading_and_uploading(name, monkeypatch):
    """`--model ID` (its download: test_deploy's loopback Hub) and `upload --repo ID` take the ids
    huggingface_hub takes (with a namespace)."""
    try:
        validate_repo_id(name)
        valid = name.count("/") == 1
    except HFValidationError:
        valid = False
    downloads = []
    monkeypatch.setattr(models, "hub_snapshot", lambda repo: downloads.append(repo) or Path(repo))
    with pytest.raises(DuomemError, match="not a model directory" if valid else "does not exist"):
        models.resolve(name)
    assert downloads == ([name] if valid else [])
    try:
        check_repo_id(name)
        accepted = True
    except DuomemError:
        accepted = False
    assert accepted == valid, name


def test_one_atomic_swap_and_one_bank_rebuild():
    """Directories are replaced through io.atomic_dir alone, and a bank rebuilt in a final model's
    space through one function (distill's adapters, quantize's package)."""
    root = Path(duomem_mlx.__file__).parent
    for module in ("convert/__init__.py", "deploy/quantize.py", "distill/train.py"):
        source = (root / module).read_text()
        assert not re.findall(r"\.rename\(|os\.replace\(|\.tmp\b", source), module
    definitions = [path for path in root.rglob("*.py") if "def rebuild_bank(" in path.read_text()]
    assert [p.relative_to(root).as_posix() for p in definitions] == ["runtime/embed.py"]


# ---------------------------------------------------------------- integrity


@pytest.mark.env("scienceworld")
def test_teach_cycling_variations_gets_unique_ids_and_a_valid_cache(tmp_path):
    out = tmp_path / "cache"
    result = run(
        "teach",
        "--teacher",
        "oracle",
        "--env",
        "scienceworld",
        "--tasks",
        "identify-life-stages-2",
        "--split",
        "dev",
        "--episodes",
        "4",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "variations repeat" in result.output
    ids = [e["id"] for e in read_cache_records(out)]
    assert len(ids) == 4 and len(set(ids)) == 4 and any(i.endswith("/1") for i in ids)
    assert verify(out) == (0, [])
    assert run("cache", "verify", out).exit_code == 0


@pytest.mark.parametrize(
    "spec",
    [
        "openai:http://user:secret@127.0.0.1:9/v1#M",
        "openai:https://user:se/cr#et@host/v1#M",
        "openai:user:secret@host#M",
        "opnai:http://user:secret@host/v1#M",
    ],
)
@pytest.mark.env("textworld")
def test_teacher_url_credentials_never_printed(spec, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "duomem_mlx",
            "teach",
            "--teacher",
            spec,
            "--env",
            "textworld",
            "--out",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "DUOMEM_OPENBLAS": "0"},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "secret" not in result.stdout + result.stderr and "se/cr" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if spec.startswith("openai:") and "@" in spec.rpartition("#")[0]:
        assert "OPENAI_API_KEY" in result.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.env("textworld")
def test_a_second_teach_on_a_locked_cache_is_refused(tmp_path, tiny_model):
    out = tmp_path / "cache"
    args = [
        "teach",
        "--teacher",
        "oracle",
        "--teacher-tokenizer",
        tiny_model,
        "--env",
        "textworld",
        "--episodes",
        "1",
        "--max-steps",
        "3",
        "--keep",
        "all",
        "--out",
        out,
    ]
    assert run(*args).exit_code == 0
    before = (out / "episodes.jsonl").read_bytes()
    with CacheWriter(out, json.loads((out / "manifest.json").read_text()), resume=True):  # another run holds it
        assert "another `duomem-mlx teach` is writing" in error_line(run(*args, "--resume"))
    assert (out / "episodes.jsonl").read_bytes() == before
    assert run(*args, "--resume").exit_code == 0  # released


# ---------------------------------------------------------------- damaged files


@pytest.mark.env("textworld")
def test_memories_with_a_bad_byte_or_shape_are_one_line_everywhere(tmp_path, tiny_model, bank_dir):
    bad_byte = tmp_path / "bytes.jsonl"
    bad_byte.write_bytes(json.dumps(MEMORIES[0]).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    bad_shape = write_jsonl(tmp_path / "shape.jsonl", [MEMORIES[0], {"text": 5}])
    for path, where in [(bad_byte, "line 2 is not UTF-8"), (bad_shape, "line 2")]:
        assert where in error_line(
            run("memory", "build", "--memories", path, "--embedder", tiny_model, "--out", tmp_path / "b")
        )
    assert not (tmp_path / "b").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(bank_dir, damaged)
    with open(damaged / "memories.jsonl", "ab") as f:
        f.write(b'{"id": "m3", "text": "\xff"}\n')
    for args in [
        ("memory", "show", damaged),
        ("memory", "search", damaged, "open the door"),
        (
            "eval",
            "--env",
            "textworld",
            "--policy",
            f"model:{tiny_model}",
            "--memory",
            damaged,
            "--out",
            tmp_path / "r.json",
        ),
        ("chat", "--model", tiny_model, "--memory", damaged),
    ]:
        assert "not UTF-8" in error_line(run(*args)), args
    assert not (tmp_path / "r.json").exists()


def test_episode_logs_and_configs_of_the_wrong_shape(tmp_path):
    log = write_jsonl(tmp_path / "log.jsonl", [{"id": "e", "steps": "not a list"}])
    assert "line 1" in error_line(run("memory", "write", "--episodes", log, "--out", tmp_path / "m.jsonl"))
    log.write_bytes(b"\xfe\xff\n")
    assert "not UTF-8" in error_line(run("memory", "write", "--episodes", log, "--out", tmp_path / "m.jsonl"))
    config = tmp_path / "c.yaml"
    config.write_bytes(b"layers: \xff\n")
    assert "not UTF-8" in error_line(run("tiny-model", tmp_path / "m", "-c", config))
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("damage", ["tokens", "task", "memory", "counts", "shard"])
@pytest.mark.env("textworld")
def test_cache_verify_checks_what_info_reads(damage, tmp_path, tiny_model):
    out = tmp_path / "cache"
    args = [
        "teach",
        "--teacher",
        "oracle",
        "--teacher-tokenizer",
        tiny_model,
        "--env",
        "textworld",
        "--episodes",
        "1",
        "--max-steps",
        "3",
        "--keep",
        "all",
        "--out",
        out,
    ]
    assert run(*args).exit_code == 0
    episode = read_cache_records(out)[0]
    manifest = json.loads((out / "manifest.json").read_text())
    if damage == "memory":
        (out / "memories.jsonl").write_bytes(b'{"text": "\xff"}\n')
    elif damage == "counts":
        (out / "manifest.json").write_text(json.dumps({**manifest, "counts": []}))
    else:
        episode[damage] = {"tokens": "12", "task": None, "shard": "../../etc/passwd"}[damage]
        write_jsonl(out / "episodes.jsonl", [episode])
    for command in ("info", "verify"):
        line = error_line(run("cache", command, out))
        assert "cache" in line and str(out) in line


# ---------------------------------------------------------------- unwritable destinations and overwrites


@pytest.mark.env("textworld")
def test_unwritable_destinations_fail_before_the_work(tmp_path, tiny_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    memories = write_jsonl(tmp_path / "memories.jsonl", MEMORIES)
    log = tmp_path / "episodes.jsonl"
    cases = [
        ("teach", "--teacher", "oracle", "--env", "textworld", "--out", blocker / "cache"),
        ("memory", "build", "--memories", memories, "--embedder", tiny_model, "--out", blocker / "bank"),
        ("memory", "write", "--episodes", memories, "--out", blocker / "m.jsonl"),
        ("tiny-model", blocker / "model"),
        ("eval", "--env", "textworld", "--episodes", "1", "--out", blocker / "r.json", "--log", log),
        ("eval", "--env", "textworld", "--episodes", "1", "--out", tmp_path / "r.json", "--log", blocker / "l.jsonl"),
        ("eval", "--env", "textworld", "--episodes", "1", "--out", log, "--log", log),
    ]
    for args in cases:
        assert "cannot write" in error_line(run(*args)) or "same file" in error_line(run(*args)), args
    assert not log.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.env("textworld")
def test_overwrites_need_force(tmp_path, tiny_model, bank_dir):
    log = tmp_path / "oracle.jsonl"
    assert (
        run(
            "eval",
            "--env",
            "textworld",
            "--tasks",
            "simple",
            "--episodes",
            "1",
            "--out",
            tmp_path / "r.json",
            "--log",
            log,
        ).exit_code
        == 0
    )
    before = log.read_bytes()
    assert "is the episode log itself" in error_line(run("memory", "write", "--episodes", log, "--out", log, "--force"))
    assert log.read_bytes() == before
    out = tmp_path / "memories.jsonl"
    assert run("memory", "write", "--episodes", log, "--out", out).exit_code == 0
    assert "--force" in error_line(run("memory", "write", "--episodes", log, "--out", out))
    assert run("memory", "write", "--episodes", log, "--out", out, "--force").exit_code == 0
    # a bank never lands in a model's directory; an existing bank is replaced only with --force
    model_files = sorted(p.name for p in tiny_model.iterdir())
    for force in ([], ["--force"]):
        assert "not a memory bank" in error_line(
            run("memory", "build", "--memories", out, "--embedder", tiny_model, "--out", tiny_model, *force)
        )
    with pytest.raises(DuomemError, match="directory of its own"):  # nor through the library
        MemoryBank.load(bank_dir).save(tiny_model)
    assert sorted(p.name for p in tiny_model.iterdir()) == model_files
    bank = tmp_path / "bank"
    shutil.copytree(bank_dir, bank)
    assert "--force" in error_line(run("memory", "build", "--memories", out, "--embedder", tiny_model, "--out", bank))
    result = run("memory", "build", "--memories", out, "--embedder", tiny_model, "--out", bank, "--force")
    assert result.exit_code == 0, result.output
    assert "Workflow" in (bank / "memories.jsonl").read_text()  # the new memories replaced the old bank's
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left


# ---------------------------------------------------------------- servers


class Broken(BaseHTTPRequestHandler):
    replies = {"/v1/models": {"data": "nothing"}, "/v1/chat/completions": {"id": "x", "object": "chat.completion"}}

    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer()

    def answer(self):
        body = json.dumps(self.replies.get(self.path, {})).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    "reply",
    [{"id": "x"}, {"choices": []}, {"choices": [{"message": "hi"}]}, {"choices": [{"message": {"content": 3}}]}, []],
)
@pytest.mark.env("textworld")
def test_a_200_reply_without_usable_choices(reply, tmp_path, tiny_model):
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Handler", (Broken,), {"replies": {**Broken.replies, "/v1/chat/completions": reply}})
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        line = error_line(
            run(
                "teach",
                "--teacher",
                f"openai:{url}#m",
                "--teacher-tokenizer",
                tiny_model,
                "--top-k",
                "0",
                "--env",
                "textworld",
                "--episodes",
                "1",
                "--out",
                tmp_path / "c",
            )
        )
        assert "OpenAI-compatible" in line
    finally:
        server.shutdown()
    assert read_cache_records(tmp_path / "c") == []


# ---------------------------------------------------------------- config keys


def test_config_keys_are_the_option_names(tmp_path):
    config = tmp_path / "c.yaml"
    out = tmp_path / "r.json"
    config.write_text(f"env: textworld\ntasks: [simple]\nepisodes: 1\nmax-steps: 2\nout: {out}\n")
    result = run("eval", "-c", config)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["max_steps"] == 2
    config.write_text(f"env_name: textworld\nmax_steps: 2\nepisodes: 1\nout: {out}\n")  # parameter names still work
    assert run("eval", "-c", config).exit_code == 0
    for text, phrase in [
        ("enviro: textworld\n", "unknown option(s) enviro; valid: adapter-path, decode, env,"),
        ("env: [textworld]\n", "env must be a single value"),
        ("episodes: many\n", "episodes: 'many' is not a valid integer"),
        ("memory: {a: 1}\n", "memory must be a single value"),
    ]:
        config.write_text(text)
        assert phrase in error_line(run("eval", "--out", out, "-c", config)), text


# ---------------------------------------------------------------- eval --log


def test_log_stores_unchanged_admissible_lists_once_and_reads_both_forms(scienceworld):
    spec = scienceworld.task_specs(["melt"], "dev", 1, 0)[0]
    episode = play_episode(scienceworld, spec, OraclePolicy(), 15)
    full, compact = episode.to_json(), episode.to_json(compact=True)
    assert sum("admissible" in s for s in compact["steps"]) < len(episode.steps)  # melt's lists repeat
    assert len(json.dumps(compact)) < len(json.dumps(full)) / 2
    for data in (full, compact):
        again = Episode.from_json(json.loads(json.dumps(data)))
        assert [s.admissible for s in again.steps] == [s.admissible for s in episode.steps]
        assert again == Episode.from_json(full)
