"""`duomem-mlx export-gguf`: an mlx-lm model back to the GGUF layout llama.cpp reads, with the
metadata of the file it was converted from."""

import json

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from gguf_writer import write_gguf

from duomem_mlx.cli import cli
from duomem_mlx.convert import convert_gguf
from duomem_mlx.runtime.models import make_tiny_model


def tensors(path) -> dict[str, tuple]:
    return {t.name: (int(t.tensor_type), np.array(t.data)) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_export_rewrites_the_source_layout(tmp_path, arch):
    """Converted and exported again, a llama.cpp-layout file comes back tensor for tensor (Q/K
    rows re-permuted for llama, Gemma's norms as 1 + w) with the source's tokenizer and template."""
    source = make_tiny_model(
        tmp_path / "tiny", arch=arch, layers=6 if arch == "gemma3_text" else 2, hidden=64, vocab_size=300, seed=3
    )
    path = write_gguf(source, tmp_path / "source.gguf")
    convert_gguf(path, tmp_path / "mlx", dtype="float32")
    result = CliRunner().invoke(
        cli, ["export-gguf", str(tmp_path / "mlx"), str(tmp_path / "out.gguf"), "--source", str(path), "--type", "f32"]
    )
    assert result.exit_code == 0, result.output
    before, after = tensors(path), tensors(tmp_path / "out.gguf")
    assert before.keys() == after.keys()
    for name, (kind, values) in before.items():
        assert after[name][0] == kind and np.array_equal(after[name][1], values), name
    fields = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    original = gguf.GGUFReader(str(path)).fields
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
        f"{fields['general.architecture'].contents()}.block_count",
    ):
        assert fields[key].contents() == original[key].contents(), key


def test_export_quantized_matrices_load_back(tmp_path):
    """--type q8_0 quantizes the matrices (vectors stay f32); convert reads the file back to the same greedy tokens."""
    source = make_tiny_model(tmp_path / "tiny", arch="llama", layers=2, hidden=64, vocab_size=300, seed=4)
    path = write_gguf(source, tmp_path / "source.gguf")
    convert_gguf(path, tmp_path / "mlx", dtype="float32")
    result = CliRunner().invoke(
        cli, ["export-gguf", str(tmp_path / "mlx"), str(tmp_path / "q8.gguf"), "--source", str(path), "--type", "q8_0"]
    )
    assert result.exit_code == 0, result.output
    kinds = {name: kind for name, (kind, _) in tensors(tmp_path / "q8.gguf").items()}
    assert (
        kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
        and kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    )
    convert_gguf(tmp_path / "q8.gguf", tmp_path / "back", dtype="float32")
    (model, tokenizer), (original, _) = mlx_lm.load(str(tmp_path / "back")), mlx_lm.load(str(tmp_path / "mlx"))
    ids = mx.array(tokenizer.encode("open the door and take the apple"))[None]
    assert (model(ids).argmax(-1) == original(ids).argmax(-1)).all().item()


def test_export_real_model_and_bad_input(tmp_path, real_models):
    """SmolLM2 as f16 from its own duomem.json source; a wrong source or a model with none is one line."""
    smol, gemma = real_models["smollm2-135m-instruct"], real_models["gemma3-270m"]
    out = tmp_path / "smol.f16.gguf"
    result = CliRunner().invoke(cli, ["export-gguf", str(smol), str(out)])
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {int(t.tensor_type) for t in reader.tensors} == {
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
    }
    again = CliRunner().invoke(cli, ["export-gguf", str(smol), str(out)])
    assert again.exit_code != 0 and "--force" in again.output
    source = json.loads((smol / "duomem.json").read_text())["source"]["file"]
    wrong = CliRunner().invoke(
        cli,
        ["export-gguf", str(gemma), str(tmp_path / "g.gguf"), "--source", str(smol.parent.parent / "gguf" / source)],
    )
    assert wrong.exit_code != 0 and "Error:" in wrong.output and "Traceback" not in wrong.output
    tiny = make_tiny_model(tmp_path / "tiny", arch="llama", layers=2, hidden=64, vocab_size=300)
    none = CliRunner().invoke(cli, ["export-gguf", str(tiny), str(tmp_path / "t.gguf")])
    assert none.exit_code != 0 and "--source" in none.output
