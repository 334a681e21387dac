"""The CLI surface: help everywhere, -c config files, tiny models that plain mlx-lm opens."""

import dataclasses
import subprocess
import sys
import time

import click
import mlx_lm
import pytest
from click.testing import CliRunner

from duomem_mlx.cli import cli
from duomem_mlx.distill.train import DistillArgs
from duomem_mlx.formats.fingerprints import tokenizer_fingerprint
from duomem_mlx.progress import Progress
from duomem_mlx.runtime.options import PolicyOptions
from duomem_mlx.teacher.options import TeachOptions


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize("path", [(), *all_commands(cli)], ids=lambda p: " ".join(p) or "duomem-mlx")
def test_every_command_has_help_with_an_example(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "duomem-mlx" in result.output.split("Options:")[0]  # an example or the pipeline


def test_expected_commands_exist():
    names = {" ".join(p) for p in all_commands(cli)}
    assert {
        "tiny-model",
        "eval",
        "chat",
        "teach",
        "cache info",
        "cache verify",
        "memory build",
        "memory search",
    } <= names


@pytest.mark.parametrize(
    "command, options",
    [("eval", "PolicyOptions"), ("chat", "PolicyOptions"), ("distill", "DistillArgs"), ("teach", "TeachOptions")],
)
def test_a_commands_defaults_are_its_stages_dataclass(command, options):
    """Each default is written once: an option of the command that is a field of the dataclass its stage
    takes defaults to that field's default (teach's --memory-k TeachOptions', eval's PolicyOptions')."""
    cls = {"PolicyOptions": PolicyOptions, "DistillArgs": DistillArgs, "TeachOptions": TeachOptions}[options]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    given = {name: default for name, default in defaults.items() if default not in (None, dataclasses.MISSING)}
    shared = [p for p in cli.commands[command].params if p.name in given and not p.is_flag]
    assert len(shared) >= 4 and "memory_k" in {p.name for p in shared}
    assert {p.name: p.default for p in shared} == {p.name: given[p.name] for p in shared}


def test_tiny_models_load_and_generate_with_plain_mlx_lm(tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    runner = CliRunner()
    assert (
        runner.invoke(cli, ["tiny-model", str(teacher), "--arch", "llama", "--layers", "3", "--hidden", "96"]).exit_code
        == 0
    )
    assert (
        runner.invoke(cli, ["tiny-model", str(student), "--tokenizer-from", str(teacher), "--seed", "3"]).exit_code == 0
    )
    models = {name: mlx_lm.load(str(path)) for name, path in [("teacher", teacher), ("student", student)]}
    assert tokenizer_fingerprint(models["teacher"][1]) == tokenizer_fingerprint(models["student"][1])
    model, tokenizer = models["student"]
    assert model.args.num_hidden_layers == 2 and model.args.hidden_size == 64
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "open the door"}], add_generation_prompt=True, tokenize=False
    )
    assert mlx_lm.generate(model, tokenizer, prompt, max_tokens=5)
    other = runner.invoke(cli, ["tiny-model", str(tmp_path / "other"), "--vocab-size", "1024"])
    assert other.exit_code == 0
    assert tokenizer_fingerprint(mlx_lm.load(str(tmp_path / "other"))[1]) != tokenizer_fingerprint(tokenizer)


def test_vocab_size_past_the_tokenizer_pads_the_head(tmp_path):
    """Like Qwen3 (151,936 rows, 151,669 tokens): the head has the rows asked for; a model made
    with --tokenizer-from keeps its source's rows, so it covers every id the source can emit."""
    runner = CliRunner()
    assert runner.invoke(cli, ["tiny-model", str(tmp_path / "big"), "--vocab-size", "5000"]).exit_code == 0
    assert (
        runner.invoke(cli, ["tiny-model", str(tmp_path / "copy"), "--tokenizer-from", str(tmp_path / "big")]).exit_code
        == 0
    )
    for name in ("big", "copy"):
        model, tokenizer = mlx_lm.load(str(tmp_path / name))
        assert model.args.vocab_size == 5000 > len(tokenizer)
        assert model.model.embed_tokens.weight.shape[0] == 5000


def test_config_file_sets_options_and_flags_override(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("layers: 3\nhidden: 96\narch: llama\n")
    result = CliRunner().invoke(cli, ["tiny-model", str(tmp_path / "m"), "-c", str(config), "--hidden", "64"])
    assert result.exit_code == 0, result.output
    assert "llama (3 layers, hidden 64)" in result.output


@pytest.mark.parametrize(
    "text, message",
    [("layerz: 3\n", "unknown option(s) layerz"), ("- 1\n- 2\n", "must be a mapping"), ("a: [\n", "not valid YAML")],
)
def test_bad_config_is_one_clear_line(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "duomem_mlx", "tiny-model", str(tmp_path / "m"), "-c", str(config)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_progress_off_a_terminal_is_a_plain_line_now_and_then(capsys, monkeypatch):
    monkeypatch.delenv("DUOMEM_PROGRESS_SECONDS", raising=False)
    for _ in Progress(range(50), desc="work", unit="item"):
        pass  # faster than the 20 s between lines: quiet
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("DUOMEM_PROGRESS_SECONDS", "0.05")
    for _ in Progress(range(3), desc="work", unit="item"):
        time.sleep(0.03)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("work: 3/3 [")  # long enough for lines: the last one closes
    monkeypatch.setenv("DUOMEM_PROGRESS_SECONDS", "0")
    bar = Progress(total=3, initial=1, desc="resumed", unit="step")
    bar.set_postfix(loss="1.234")
    bar.update()
    bar.update()
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["2/3", "3/3"] and "loss=1.234" in lines[-1]
