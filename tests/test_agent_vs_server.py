"""The peer benchmark runs end to end against a real mlx_lm.server on loopback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = {
    "peer",
    "model_config",
    "bytes_of_weights",
    "mode",
    "steps",
    "peer_step_ms",
    "ours_step_ms",
    "speedup_mean",
    "speedup_p50",
    "forward_passes_per_action",
    "prefill_tokens_per_step",
    "decode_tokens_per_step",
    "same_actions",
    "machine",
    "mlx",
    "mlx_lm",
}


@pytest.mark.env("textworld")
def test_agent_vs_server_two_steps(tiny_model, tmp_path):
    out = tmp_path / "result.json"
    script = Path(__file__).parents[1] / "benchmarks" / "agent_vs_server.py"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--model",
            str(tiny_model),
            "--env",
            "textworld",
            "--steps",
            "2",
            "--train-steps",
            "2",
            "--vocab-rows",
            "4096",
            "--mode",
            "agent",
            "--json",
            str(out),
        ],
        check=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert KEYS <= result.keys()
    assert result["mode"] == "agent" and result["steps"] == 2
    assert result["vocab_rows"] == 4096 and 0 < result["head_share_of_weights"] < 1  # the server loaded the padded head
    for side in ("peer_step_ms", "ours_step_ms"):
        assert 0 < result[side]["p50"] <= result[side]["p95"]
    assert 0 <= result["same_actions"] <= 1
    ours, peer = result["forward_passes_per_action"]["ours"], result["forward_passes_per_action"]["peer"]
    assert ours < peer  # jump-forward: no pass on forced tokens, no look-ahead pass
