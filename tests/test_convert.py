"""`duomem-mlx convert`: real GGUF files (SmolLM2-135M-Instruct, Gemma 3 270M, from PyPI wheels)
and tiny models written as llama.cpp would, back through the converter into plain mlx-lm."""

import json
import math

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from click.testing import CliRunner
from gguf_writer import write_gguf
from mlx_lm.models.cache import make_prompt_cache
from transformers import AutoTokenizer

from duomem_mlx.cli import cli
from duomem_mlx.convert import convert_gguf
from duomem_mlx.convert.export import permute
from duomem_mlx.convert.fetch import fetch_gguf
from duomem_mlx.runtime.models import make_tiny_model

PARAGRAPH = (
    "The history of the city begins in the early Middle Ages, when a small settlement grew up around a bridge "
    "over the river. Merchants came to trade wool and grain, and by the thirteenth century the town had a "
    "market, a church and a wall. Over the following centuries it became known for its university, its "
    "printing houses and its many libraries."
)
# Measured on PARAGRAPH: SmolLM2 15.8, Gemma 3 270M 12.3; SmolLM2 with Q/K rows left in llama.cpp's order 73.
PERPLEXITY_BOUND = 25
ROUND_TRIP = "Digits 0123456789, spaces  and\ttabs, unicode: ça, 日本語, emoji 🙂, end.\n\nNew paragraph."


def perplexity(model, tokenizer, text=PARAGRAPH) -> float:
    ids = mx.array(tokenizer.encode(text))[None]
    logits = model(ids[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())


def greedy(model, tokenizer, prompt: str, tokens: int = 12) -> str:
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=tokens)


@pytest.fixture(scope="module")
def smollm2(real_models):
    return mlx_lm.load(str(real_models["smollm2-135m-instruct"]))


@pytest.fixture(scope="module")
def gemma3(real_models):
    return mlx_lm.load(str(real_models["gemma3-270m"]))


def test_smollm2_answers_and_reads_english(smollm2, real_models):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert "Paris" in greedy(model, tokenizer, prompt)
    assert perplexity(model, tokenizer) < PERPLEXITY_BOUND
    record = json.loads((real_models["smollm2-135m-instruct"] / "duomem.json").read_text())
    assert record["gguf"]["types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1} and record["chat_template"] == "gguf"


def test_a_broken_conversion_fails_the_bound(smollm2, gemma3):
    """The perplexity bound catches what goes wrong: Q/K rows in llama.cpp's order, Gemma's norms as 1 + w."""
    for (model, tokenizer), breaks in ((smollm2, "rope"), (gemma3, "norms")):
        saved = dict(nn.utils.tree_flatten(model.parameters()))
        broken = {}
        for name, value in saved.items():
            if breaks == "rope" and (".q_proj." in name or ".k_proj." in name):
                broken[name] = mx.array(permute(value, 9 if ".q_proj." in name else 3))
            elif breaks == "norms" and "norm" in name:
                broken[name] = value + 1
        model.load_weights(list(broken.items()), strict=False)
        try:
            assert perplexity(model, tokenizer) > 2 * PERPLEXITY_BOUND
        finally:
            model.load_weights(list(saved.items()))


def test_kept_quant_agrees_with_dequantized(smollm2, model_root, tmp_path):
    """Q4_1 / Q8_0 blocks kept as MLX affine quantization give the dequantized model's tokens."""
    convert_gguf(fetch_gguf("smollm2-135m-instruct", root=model_root), tmp_path / "kept", keep_quant=True)
    kept, tokenizer = mlx_lm.load(str(tmp_path / "kept"))
    config = json.loads((tmp_path / "kept" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["model.embed_tokens"]["bits"] == 8
    model, _ = smollm2
    ids = mx.array(tokenizer.encode(PARAGRAPH))[None]
    agree = (kept(ids).argmax(-1) == model(ids).argmax(-1)).astype(mx.float32).mean().item()
    assert agree >= 0.98
    prompt = "Once upon a time"
    assert greedy(kept, tokenizer, prompt, 4) == greedy(model, tokenizer, prompt, 4)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_tokenizer_round_trips(real_models, name):
    tokenizer = AutoTokenizer.from_pretrained(str(real_models[name]))
    ids = tokenizer.encode(ROUND_TRIP, add_special_tokens=False)
    assert tokenizer.decode(ids) == ROUND_TRIP
    specials = ["<|im_start|>", "<|im_end|>"] if name.startswith("smollm2") else ["<start_of_turn>", "<end_of_turn>"]
    for special in specials:
        assert tokenizer.encode(f"a{special}b", add_special_tokens=False)[1:2] == [
            tokenizer.convert_tokens_to_ids(special)
        ]
    generation = json.loads((real_models[name] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ([2] if name.startswith("smollm2") else [1, 106])


def test_gemma3_base_model(gemma3, real_models):
    model, tokenizer = gemma3
    assert tokenizer.encode("Hi")[0] == tokenizer.bos_token_id  # add_bos, as the GGUF says
    assert perplexity(model, tokenizer) < PERPLEXITY_BOUND
    few_shot = "Q: What is the capital of Italy?\nA: Rome.\nQ: What is the capital of France?\nA:"
    assert greedy(model, tokenizer, few_shot, 3).strip().startswith("Paris")
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert chat == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    record = json.loads((real_models["gemma3-270m"] / "duomem.json").read_text())
    assert record["chat_template"].startswith("gemma") and {"Q5_0", "Q4_K", "Q6_K", "Q8_0"} <= set(
        record["gguf"]["types"]
    )


def test_gemma3_sliding_window_in_cached_chunks(gemma3):
    """Past the 512-token window, feeding 256-token chunks through the rotating cache gives the
    logits of one pass."""
    model, tokenizer = gemma3
    ids = tokenizer.encode(" ".join([PARAGRAPH] * 12))[:700]
    assert len(ids) == 700
    whole = model.model(mx.array(ids)[None])[0, -1]  # the backbone: the same hidden state gives the same logits
    cache = make_prompt_cache(model)
    for start in range(0, len(ids), 256):
        last = model.model(mx.array(ids[start : start + 256])[None], cache=cache)[0, -1]
    assert mx.allclose(whole, last, atol=1e-3, rtol=1e-3).item()


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_llama_cpp_layout_round_trips(tmp_path, arch, qtype):
    """A tiny model written as llama.cpp writes it converts back to the same logits (F32), or
    to its dequantized twin's logits when the GGML blocks are kept."""
    layers = 6 if arch == "gemma3_text" else 2
    source = make_tiny_model(tmp_path / "tiny", arch=arch, layers=layers, hidden=64, vocab_size=300, seed=2)
    if arch == "gemma3_text":  # llama.cpp's Gemma 3 pattern (the GGUF does not carry it)
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(dict(config, sliding_window_pattern=6)))
    path = write_gguf(source, tmp_path / "tiny.gguf", gguf.GGMLQuantizationType[qtype])
    convert_gguf(path, tmp_path / "dense", dtype="float32")
    dense, tokenizer = mlx_lm.load(str(tmp_path / "dense"))
    ids = mx.array(tokenizer.encode("open the door and take the apple from the table"))[None]
    if qtype == "F32":
        original, original_tokenizer = mlx_lm.load(str(source))
        assert tokenizer.encode(ROUND_TRIP) == original_tokenizer.encode(ROUND_TRIP)
        assert mx.allclose(dense(ids), original(ids), atol=1e-4).item()
        return
    convert_gguf(path, tmp_path / "kept", dtype="float32", keep_quant=True)
    kept, _ = mlx_lm.load(str(tmp_path / "kept"))
    assert "quantization" in json.loads((tmp_path / "kept" / "config.json").read_text())
    assert mx.allclose(dense(ids), kept(ids), atol=1e-3).item()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kept_blocks_are_the_files_own_values_in_any_dtype(tmp_path, dtype):
    """--keep-quant keeps the GGML blocks' float16 scales and biases exactly (float16, or float32 in
    a float32 model; bfloat16 rounded them): each kept matrix is exactly gguf's dequantization."""
    source = make_tiny_model(tmp_path / "tiny", arch="qwen3", layers=2, hidden=64, vocab_size=300, seed=5)
    files = {}
    for qtype in ("Q4_0", "Q4_1", "Q8_0"):
        path = write_gguf(source, tmp_path / f"{qtype}.gguf", gguf.GGMLQuantizationType[qtype])
        convert_gguf(path, tmp_path / qtype, dtype=dtype, keep_quant=True)
        weights = mx.load(str(tmp_path / qtype / "model.safetensors"))
        for tensor in gguf.GGUFReader(str(path)).tensors:
            if tensor.name == "blk.0.attn_q.weight":
                files[qtype] = (tensor, weights, "model.layers.0.self_attn.q_proj")
    for qtype, (tensor, weights, module) in files.items():
        scales, biases = weights[f"{module}.scales"], weights[f"{module}.biases"]
        assert scales.dtype == biases.dtype == (mx.float32 if dtype == "float32" else mx.float16), qtype
        ours = mx.dequantize(
            weights[f"{module}.weight"],
            scales.astype(mx.float32),
            biases.astype(mx.float32),
            group_size=32,
            bits=8 if qtype == "Q8_0" else 4,
        )
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert mx.array_equal(ours, mx.array(theirs)).item(), qtype
        x = mx.random.normal((3, theirs.shape[1])).astype(getattr(mx, dtype))  # the layer as the model runs it
        out = mx.quantized_matmul(
            x, weights[f"{module}.weight"], scales, biases, group_size=32, bits=8 if qtype == "Q8_0" else 4
        )
        assert mx.allclose(
            out.astype(mx.float32), x.astype(mx.float32) @ mx.array(theirs).T, rtol=1e-5, atol=1e-6
        ).item(), qtype


def test_requantize_with_bits(tmp_path):
    source = make_tiny_model(tmp_path / "tiny", arch="qwen3", layers=2, hidden=64, vocab_size=300)
    path = write_gguf(source, tmp_path / "tiny.gguf")
    result = CliRunner().invoke(cli, ["convert", str(path), str(tmp_path / "q"), "--bits", "8", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 8
    model, tokenizer = mlx_lm.load(str(tmp_path / "q"))
    original, _ = mlx_lm.load(str(source))
    ids = mx.array(tokenizer.encode("take the apple"))[None]
    assert (model(ids).argmax(-1) == original(ids).argmax(-1)).all().item()


def test_convert_bits_and_quantize_refuse_a_group_size_that_leaves_layers_dense(tmp_path):
    """One rule: a group size that does not divide some layers' input size (hidden 96 in groups of
    64; mlx-lm would leave them dense without a word) is refused, naming them and what fits."""
    source = make_tiny_model(tmp_path / "tiny", arch="qwen3", layers=2, hidden=96, vocab_size=300)
    path = write_gguf(source, tmp_path / "tiny.gguf")
    errors = []
    for args in (
        ["convert", str(path), str(tmp_path / "c"), "--bits", "4", "--group-size", "64"],
        ["quantize", "--model", str(source), "--group-size", "64", "--out", str(tmp_path / "q")],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        errors += [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and errors[0] == errors[1], errors
    assert (
        "of 15 of 15 layers, which would stay dense: model.embed_tokens (96), model.layers.0.mlp.down_proj (288)"
        in errors[0]
    )
    assert errors[0].endswith("use --group-size 32")
    assert not (tmp_path / "c").exists() and not (tmp_path / "q").exists()


def test_bad_input_is_one_line(tmp_path, model_root):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    truncated = tmp_path / "t.gguf"
    source = fetch_gguf("smollm2-135m-instruct", root=model_root)
    truncated.write_bytes(source.read_bytes()[:4_000_000])
    other = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(other), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path, words in ((not_gguf, "not a GGUF file"), (truncated, "damaged or truncated"), (other, "not supported")):
        result = CliRunner().invoke(cli, ["convert", str(path), str(tmp_path / "out")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert (
            result.output.startswith("Error: ")
            and words in result.output
            and len(result.output.strip().splitlines()) == 1
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    result = CliRunner().invoke(cli, ["convert", "--fetch", "no-such-model"])
    assert result.exit_code == 1 and "known: smollm2-135m-instruct" in result.output


def test_list_and_help():
    runner = CliRunner()
    assert "gemma3-270m" in runner.invoke(cli, ["convert", "--list"]).output
    assert "Examples" in runner.invoke(cli, ["convert", "--help"]).output
