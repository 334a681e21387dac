"""duomem.json (a converted model's and a package's provenance, distill's summary) and the adapters
directory, through formats/manifest.py and formats/adapters.py: the bytes every writer puts on disk,
and a damaged file as one line naming the fix, or tolerated where the file is only a hint."""

import json

import pytest

from duomem_mlx.convert.export import source_of
from duomem_mlx.convert.fetch import _converted_from
from duomem_mlx.deploy.quantize import provenance, write_card
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats import adapters, manifest

PACKAGE = {"format": 1, "name": "p", "base": "org/base", "quantization": {"bits": 4}, "memory": None, "results": {}}
DAMAGED = [
    (b'{"base": ', "is not valid JSON (line 1"),
    (b'{"base": "caf\xe9"}', "line 1 is not UTF-8 text"),
    (b'["base"]', "unexpected content (ValueError: expected a JSON object)"),
    (b'{"results": "fast"}', "unexpected content (ValueError: results must be an object or null)"),
]


def test_each_writer_keeps_its_bytes(tmp_path):
    manifest.write(tmp_path, PACKAGE)
    assert manifest.path(tmp_path).read_text() == json.dumps(PACKAGE, indent=2) + "\n"
    assert manifest.read(tmp_path) == PACKAGE
    run = tmp_path / "run"
    run.mkdir()
    assert not adapters.finished(run)
    adapters.write_summary(run, {"teacher": "big", "cache": "c"})
    assert (run / "duomem.json").read_bytes() == b'{\n "teacher": "big",\n "cache": "c"\n}'
    assert adapters.finished(run) and adapters.read_summary(run) == {"teacher": "big", "cache": "c"}
    adapters.write_adapter_config(run, {"rank": 8})
    assert (run / "adapter_config.json").read_text() == '{\n    "rank": 8\n}'
    with pytest.raises(DuomemError, match="is not an mlx-lm adapter directory .* pass the output of `duomem-mlx"):
        adapters.check_adapters(run)  # no adapters.safetensors
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))  # no temporary file left


@pytest.mark.parametrize("data, says", DAMAGED)
def test_a_damaged_duomem_json_is_one_line_naming_the_fix(data, says, tmp_path):
    manifest.path(tmp_path).write_bytes(data)
    with pytest.raises(DuomemError) as e:
        manifest.read(tmp_path, manifest.PACKAGE_FIX)
    assert str(tmp_path / "duomem.json") in str(e.value) and says in str(e.value), e.value
    assert str(e.value).endswith("write the package again with `duomem-mlx quantize`")
    with pytest.raises(DuomemError, match="duomem.json.*pass --source FILE"):
        source_of(tmp_path)  # export's GGUF source
    with pytest.raises(DuomemError, match="write the package again"):
        write_card(tmp_path)  # quantize's and upload's model card
    assert not (tmp_path / "README.md").exists()


@pytest.mark.parametrize("data", [data for data, _ in DAMAGED])
def test_where_duomem_json_is_only_a_hint_damage_is_no_hint(data, tmp_path):
    run, model = tmp_path / "run", tmp_path / "model"
    for directory in (run, model):
        directory.mkdir()
    manifest.write(model, {"teacher": "from-the-package", "source": {"sha256": "ab"}})
    assert provenance(str(run), str(model))["teacher"] == "from-the-package"  # the adapters have no summary
    assert _converted_from(model) == "ab"
    manifest.path(run).write_bytes(data)
    manifest.path(model).write_bytes(data)
    assert provenance(str(run), str(model)) == {}  # the package is made, without a teacher's name
    assert _converted_from(model) is None  # the fetch cache converts again
