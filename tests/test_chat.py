import json
import subprocess
import sys


def run_chat(args, stdin):
    return subprocess.run(
        [sys.executable, "-m", "duomem_mlx", "chat", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_chat_repl_on_piped_input(tiny_model, tmp_path):
    memories = tmp_path / "memories.jsonl"
    memories.write_text(
        json.dumps({"id": "boil-1", "task_type": "boil", "text": "to boil water: fill a pot, heat it on the stove"})
        + "\n"
    )
    bank = tmp_path / "bank"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "duomem_mlx",
            "memory",
            "build",
            "--memories",
            str(memories),
            "--embedder",
            str(tiny_model),
            "--out",
            str(bank),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    result = run_chat(
        ["--model", str(tiny_model), "--memory", str(bank), "--max-tokens", "8"],
        "how do I boil water?\n/stats\n/memory\n/reset\n/stats\nanother question\n",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("[memory boil-1]") >= 3  # shown at retrieval, by /memory, and after /reset
    stats = [line for line in out.splitlines() if line.startswith("prefill")]
    assert len(stats) == 2
    assert "decoded 8 tok" in stats[0] and "prefill 0 tok" in stats[1]
    assert "Traceback" not in result.stderr


def test_chat_quit_and_missing_model(tiny_model, tmp_path):
    assert run_chat(["--model", str(tiny_model)], "/quit\nnever answered\n").stdout.strip() == ""
    missing = run_chat(["--model", str(tmp_path / "nope")], "")
    assert missing.returncode != 0
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_chat_reads_bytes_that_are_not_utf8(tiny_model):
    result = subprocess.run(
        [sys.executable, "-m", "duomem_mlx", "chat", "--model", str(tiny_model), "--max-tokens", "4"],
        input=b"\xff\xfe hello\n",
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr and result.stdout.strip()
