"""The CPU quantized kernel never takes the process down: a broken library, a stray `mlx/` folder,
a missing nanobind or inputs it cannot take cost a fallback or a ValueError; a failure is remembered.
Every case runs in a child process (on main each of them crashed or raised there)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from duomem_mlx.cpu import kernel as cpu_kernel

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the CPU quantized kernel is built on Linux only")

KERNELS = "from duomem_mlx.cpu import kernel as cpu_kernel; print(cpu_kernel.kernels())"


def child(code: str, cache=None, cwd=None, **env) -> subprocess.CompletedProcess:
    extra = {"DUOMEM_CACHE": str(cache)} if cache else {}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **extra, **env},
    )


@pytest.fixture(scope="module")
def built():
    path = cpu_kernel.build()
    assert path is not None
    return path


def test_a_truncated_library_costs_a_fallback_not_the_run(built, tmp_path):
    """Half a library (a power cut during an unsynced rename) killed every start with SIGBUS."""
    (tmp_path / "cpu_kernel").mkdir()
    (tmp_path / "cpu_kernel" / built.name).write_bytes(built.read_bytes()[: built.stat().st_size // 2])
    first = child(KERNELS, tmp_path)
    assert first.returncode == 0 and first.stdout.strip() == "None", first.stderr
    assert "SIGBUS" in first.stderr and "make setup" in first.stderr and len(first.stderr.strip().splitlines()) == 1
    assert "SIGBUS" in (tmp_path / "cpu_kernel" / f"{built.name}.failed").read_text()
    again = child(KERNELS, tmp_path)  # remembered: no probe, no build
    assert again.returncode == 0 and again.stdout.strip() == "None" and "remembered" in again.stderr


def test_a_good_library_is_probed_once_then_known_by_its_digest(built, tmp_path):
    (tmp_path / "cpu_kernel").mkdir()
    shutil.copy(built, tmp_path / "cpu_kernel" / built.name)
    for _ in range(2):
        result = child(KERNELS, tmp_path)
        assert result.returncode == 0 and "_quantized_matvec" in result.stdout and result.stderr == ""
    stamp = tmp_path / "cpu_kernel" / f"{built.name}.ok"
    assert stamp.read_text().strip() == cpu_kernel.hashlib.sha256(built.read_bytes()).hexdigest()


def test_a_failed_build_is_remembered_until_make_setup(tmp_path):
    failed = child(KERNELS, tmp_path, CXX="false")
    assert failed.stdout.strip() == "None" and "could not build" in failed.stderr
    again = child(KERNELS, tmp_path)  # a working compiler now, but no build in every process's first forward
    assert again.stdout.strip() == "None" and "building" not in again.stderr and "remembered" in again.stderr
    setup = child("import runpy; runpy.run_module('duomem_mlx.cpu.kernel', run_name='__main__')", tmp_path, CXX="false")
    assert "could not build" in setup.stderr and "remembered" not in setup.stderr  # make setup tries again


def test_an_mlx_folder_in_the_working_directory_is_not_mlx(tmp_path):
    (tmp_path / "mlx" / "include").mkdir(parents=True)
    result = child("from duomem_mlx.cpu import kernel as cpu_kernel; print(cpu_kernel.mlx_dir())", cwd=tmp_path)
    assert result.stdout.strip() == cpu_kernel.mlx_dir() != str(tmp_path / "mlx")
    assert (cpu_kernel.Path(cpu_kernel.mlx_dir()) / "include").is_dir()


def test_without_nanobind_the_first_forward_falls_back(tmp_path):
    code = """
    import sys, importlib.metadata as metadata
    sys.modules["nanobind"] = None
    version = metadata.version
    def without_nanobind(name):
        if name == "nanobind":
            raise metadata.PackageNotFoundError(name)
        return version(name)
    metadata.version = without_nanobind
    from duomem_mlx.cpu import kernel as cpu_kernel
    print(cpu_kernel.kernels())
    """
    result = child(code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "None" and "no nanobind" in result.stderr, result.stderr


def test_inputs_the_kernel_cannot_take_are_a_value_error(built):
    """0 rows (SIGSEGV), group_size 0 or an empty W (SIGFPE) are refused before a kernel runs."""
    code = """
    import mlx.core as mx
    from duomem_mlx.cpu import kernel as cpu_kernel
    kernels = cpu_kernel.kernels()
    w, scales, biases = mx.quantize(mx.ones((64, 128)), group_size=64, bits=4)
    empty = mx.zeros((64, 0), mx.uint32), mx.zeros((64, 0)), mx.zeros((64, 0))
    cases = [lambda: kernels.quantized_matvec(mx.ones((0, 128)), w, scales, biases, 64, 4),
             lambda: kernels.quantized_matvec(mx.ones((1, 128)), w, scales, biases, 0, 4),
             lambda: kernels.dequantize(w, scales, biases, 0, 4),
             lambda: kernels.quantized_matvec(mx.ones((1, 0)), *empty, 64, 4),
             lambda: kernels.dequantize(*empty, 64, 4)]
    for case in cases:
        try:
            mx.eval(case())
            print("accepted")
        except ValueError as error:
            print("refused" if "cpu_kernel" in str(error) else error)
    """
    result = child(code)
    assert result.returncode == 0 and result.stdout.split() == ["refused"] * 5, result.stderr
