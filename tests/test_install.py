"""A Mac user's first hour, checked from here: the project resolves from wheels on every platform MLX has, Java and
Python count as found only when they run, a Python without pip is told what to do, and a test whose environment is
not installed is skipped naming the extra."""

import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (uv's --python-platform, Python, whether `envs` has TextWorld there)
PLATFORMS = [
    ("aarch64-apple-darwin", "3.11", False),
    ("aarch64-apple-darwin", "3.12", False),
    ("aarch64-apple-darwin", "3.13", False),
    ("x86_64-manylinux_2_35", "3.11", True),  # MLX's Linux wheels are manylinux_2_35
    ("x86_64-manylinux_2_35", "3.13", True),
    ("aarch64-manylinux_2_35", "3.11", False),
    ("aarch64-manylinux_2_35", "3.13", False),
]
# jericho, the Z-machine TextWorld plays its games on, is published as source only (a C compiler builds it);
# every other package must come as a wheel.
SOURCE_ONLY = ["jericho"]
REGISTRY_DOWN = ("Failed to fetch", "Could not connect", "dns error", "error sending request", "Network is unreachable")


def resolve(pyproject: Path, platform: str, python: str) -> subprocess.Popen:
    """`uv pip compile` for `platform` from wheels alone (uv's own index: PyPI unless UV_DEFAULT_INDEX names one)."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed: pip install -e '.[dev]'")
    command = [
        uv,
        "pip",
        "compile",
        str(pyproject),
        "--extra",
        "envs",
        "--extra",
        "dev",
        "--python-platform",
        platform,
        "--python-version",
        python,
        "--only-binary",
        ":all:",
        "--quiet",
        "--no-header",
        "--no-annotate",
        "--no-python-downloads",
    ]  # jericho's metadata builds on this Python
    command += [arg for package in SOURCE_ONLY for arg in ("--no-binary", package)]
    env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": "14.0"}  # mlx's oldest macOS wheels are macosx_14_0
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    down = [line.strip() for line in err.splitlines() if any(sign in line for sign in REGISTRY_DOWN)]
    if process.returncode and down:
        pytest.skip(f"the package registry does not answer uv ({down[0]})")
    return process.returncode, out, err


def pins(compiled: str) -> dict[str, str]:
    return dict(line.split("==") for line in compiled.splitlines() if "==" in line)


def test_the_project_resolves_from_wheels_on_macos_arm64_and_linux():
    running = [
        (platform, python, textworld, resolve(ROOT / "pyproject.toml", platform, python))
        for platform, python, textworld in PLATFORMS
    ]
    for platform, python, textworld, process in running:
        code, out, err = finish(process)
        assert code == 0, f"{platform} Python {python}: {err}"
        resolved = pins(out)
        assert {"mlx", "mlx-lm", "textworld-express", "scienceworld", "pytest", "uv"} <= set(resolved), (platform, out)
        assert ("mlx-metal" in resolved) == ("darwin" in platform) and ("mlx-cpu" in resolved) == ("linux" in platform)
        assert ("textworld" in resolved) == textworld and ("jericho" in resolved) == textworld, (platform, python)


def test_the_check_fails_when_a_pin_has_no_wheel_there(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    unmarked, count = re.subn(r'"duomem-mlx\[textworld\];[^"]*"', '"textworld>=1.7"', text)
    assert count == 1
    (tmp_path / "pyproject.toml").write_text(unmarked)
    code, _, err = finish(resolve(tmp_path / "pyproject.toml", "aarch64-apple-darwin", "3.11"))
    assert code != 0 and "textworld" in err and "wheels" in err, err


def test_the_check_skips_where_the_registry_does_not_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("UV_DEFAULT_INDEX", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    with pytest.raises(pytest.skip.Exception, match=r"registry does not answer uv \(.*Failed to fetch"):
        finish(resolve(ROOT / "pyproject.toml", "aarch64-apple-darwin", "3.11"))


def java_stub(directory: Path) -> Path:
    """What /usr/bin/java does on a Mac with no JDK installed."""
    directory.mkdir()
    stub = directory / "java"
    stub.write_text(
        '#!/bin/sh\necho "The operation couldn\'t be completed. Unable to locate a Java Runtime." >&2\n'
        "echo 'Please visit http://www.java.com for information on installing Java.' >&2\nexit 1\n"
    )
    stub.chmod(0o755)
    return directory


def eval_twx(tmp_path, **env):
    environment = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"} | env
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "duomem_mlx",
            "eval",
            "--env",
            "twx",
            "--tasks",
            "coin",
            "--episodes",
            "1",
            "--policy",
            "oracle",
            "--out",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


@pytest.mark.env("twx")
def test_a_java_that_does_not_run_is_one_line_naming_the_fix(tmp_path):
    stubs = java_stub(tmp_path / "bin")
    result = eval_twx(tmp_path, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (
        result.stderr.startswith("Error: TextWorldExpress needs Java 11+")
        and "Unable to locate a Java Runtime" in result.stderr
        and "JAVA_HOME" in result.stderr
    ), result.stderr


@pytest.mark.env("twx")
def test_java_home_wins_over_a_java_on_path_that_does_not_run(tmp_path):
    java = shutil.which("java")
    if java is None or subprocess.run([java, "-version"], capture_output=True).returncode:
        pytest.skip("no Java runs here (the JDK this test points JAVA_HOME at)")
    home = Path(os.path.realpath(java)).parents[1]
    stubs = java_stub(tmp_path / "bin")
    result = eval_twx(tmp_path, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", JAVA_HOME=str(home))
    assert result.returncode == 0, result.stderr
    assert "100.0%" in result.stdout


def test_system_deps_on_a_mac_without_a_jdk_stop_with_the_hint(tmp_path):
    """scripts/install_system_deps.sh where `uname` says Darwin and `java` is macOS's stub; JAVA_HOME then fixes it."""
    stubs = java_stub(tmp_path / "bin")
    (stubs / "uname").write_text("#!/bin/sh\necho Darwin\n")
    (stubs / "uname").chmod(0o755)

    def run(**env):
        return subprocess.run(
            ["/bin/bash", str(ROOT / "scripts" / "install_system_deps.sh")],
            capture_output=True,
            text=True,
            env={"PATH": str(stubs), **env},
            timeout=60,
        )

    stopped = run()
    assert stopped.returncode == 1 and len(stopped.stderr.strip().splitlines()) == 1, stopped.stderr
    assert stopped.stderr.startswith("Error: no Java runs") and "brew install openjdk" in stopped.stderr
    assert "export JAVA_HOME=$(brew --prefix openjdk)/libexec/openjdk.jdk/Contents/Home" in stopped.stderr
    java = shutil.which("java")
    if java and subprocess.run([java, "-version"], capture_output=True).returncode == 0:
        assert run(JAVA_HOME=str(Path(os.path.realpath(java)).parents[1])).returncode == 0


def run_make(path: Path, *args) -> subprocess.CompletedProcess:
    """make in the repository with only `path` on PATH (the Pythons it may find), its venv in a temporary folder."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    return subprocess.run(
        [make, "-C", str(ROOT), "--no-print-directory", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(path)},
        timeout=60,
    )


def old_python() -> str | None:
    """A Python older than 3.11 on this machine, if any (pyenv's, Debian's)."""
    for candidate in [*sorted(Path.home().glob(".pyenv/versions/3.*/bin/python3")), Path("/usr/bin/python3.9")]:
        too_old = "import sys; sys.exit(sys.version_info >= (3, 11))"
        if candidate.exists() and subprocess.run([candidate, "-c", too_old], capture_output=True).returncode == 0:
            return str(candidate)
    return None


def test_make_stops_in_one_line_without_a_python_3_11(tmp_path):
    pythons = tmp_path / "bin"
    pythons.mkdir()
    if old_python():  # as a stock Mac: python3 is 3.9
        (pythons / "python3").symlink_to(old_python())
    venv = tmp_path / "venv"
    result = run_make(pythons, f"VENV={venv}", f"{venv}/.installed-test")
    assert result.returncode != 0 and not venv.exists()
    assert result.stderr.strip().splitlines()[0].startswith("Error: duomem-mlx needs Python 3.11+"), result.stderr
    assert "brew install python@3.12" in result.stderr


def test_make_takes_the_newest_python_that_is_3_11_or_later(tmp_path):
    pythons = tmp_path / "bin"
    pythons.mkdir()
    for name in ("python3", "python3.11"):
        (pythons / name).symlink_to(os.path.realpath(sys.executable))
    if old_python():
        (pythons / "python3.13").symlink_to(old_python())  # a name is not a version: it must say >= 3.11 itself
    venv = tmp_path / "venv"
    result = run_make(pythons, "-n", f"VENV={venv}", f"{venv}/.installed-test")
    assert result.returncode == 0, result.stderr
    assert f"{pythons}/python3.11 -m venv {venv}" in result.stdout


def test_convert_fetch_in_a_python_without_pip_names_the_fix(tmp_path):
    """A venv made without pip (as uv makes them) that sees every installed package but pip."""
    venv = tmp_path / "venv"
    subprocess.run([os.path.realpath(sys.executable), "-m", "venv", "--without-pip", str(venv)], check=True)
    packages = tmp_path / "packages"
    packages.mkdir()
    for entry in Path(site.getsitepackages()[0]).iterdir():
        if entry.name != "pip" and not entry.name.startswith("pip-"):
            (packages / entry.name).symlink_to(entry)
    (next(venv.glob("lib/python3*/site-packages")) / "packages.pth").write_text(f"{packages}\n")
    python = venv / "bin" / "python"
    assert (
        "No module named pip"
        in subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True).stderr
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DUOMEM_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [python, "-m", "duomem_mlx", "convert", "--fetch", "smollm2-135m-instruct"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error and "has no pip" in error[0] and "-m ensurepip" in error[0], result.stderr


SKIPPED_ENV = """
import pytest

@pytest.mark.env("alfworld")
def test_plays_alfworld():
    raise AssertionError("ran without its environment")
"""


def test_a_test_whose_environment_is_not_installed_is_skipped_naming_the_extra(pytester):
    if importlib.util.find_spec("alfworld"):
        pytest.skip("alfworld is installed here: no environment is missing to test the skip with")
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(SKIPPED_ENV)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*alfworld is not installed: pip install -e '.[[]alfworld[]]'*"])
