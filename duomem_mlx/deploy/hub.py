"""`duomem-mlx upload`: a converted package to the Hugging Face Hub, allow-listed files only,
in one commit (huggingface_hub `create_repo` + `upload_folder`). The token comes from HF_TOKEN
or the stored login and is never printed or written."""

from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from duomem_mlx.deploy.quantize import write_card
from duomem_mlx.errors import DuomemError
from duomem_mlx.formats import manifest
from duomem_mlx.runtime.models import is_repo_id, transport_error

# Weights, config, tokenizer, memory bank, provenance, card, plots; nothing else (no caches,
# logs, dotfiles, code).
ALLOW = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "memory/bank.json",
    "memory/memories.jsonl",
    "memory/keys.safetensors",
    manifest.NAME,
    "README.md",
    "*.png",
]
IGNORE = [".*", "*/.*", "*.py", "*.log", "*.tmp"]


def package_files(package: Path) -> list[tuple[str, int]]:
    """(path in repo, bytes) of what an upload sends, by the same filter upload_folder applies."""
    paths = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file())
    return [
        (p, (package / p).stat().st_size)
        for p in filter_repo_objects(paths, allow_patterns=ALLOW, ignore_patterns=IGNORE)
    ]


def check_repo_id(repo: str) -> None:
    if not is_repo_id(repo):
        raise DuomemError(f"--repo {repo!r} is not a Hub repo id; use USER/NAME with letters, digits, '-', '_' or '.'")


def check_package(package: Path) -> None:
    if not (package / "config.json").is_file() or not list(package.glob("model*.safetensors")):
        raise DuomemError(
            f"{package} is not a model package (no config.json / model*.safetensors); "
            "write one with `duomem-mlx quantize`"
        )


def upload(
    package: str, repo: str, private: bool = False, dry_run: bool = False, message: str | None = None
) -> list[tuple[str, int]]:
    package = Path(package)
    check_repo_id(repo)
    check_package(package)
    if not (package / "memory" / "bank.json").is_file():
        print("note: this package has no memory bank (memory/); it works, without memories")
    files = package_files(package)
    if dry_run:
        for path, size in files:
            print(f"{size:>12,}  {path}")
        print(f"{len(files)} files, {sum(s for _, s in files) / 1e6:.2f} MB would go to {repo} (dry run: nothing sent)")
        return files
    return push(package, repo, private, message or f"Upload {package.name} with duomem-mlx", files)


def push(package: Path, repo: str, private: bool, message: str, files) -> list[tuple[str, int]]:
    token = get_token()
    if not token:
        raise DuomemError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    if manifest.path(package).is_file():
        write_card(package, repo)  # the card's results table from duomem.json, the usage snippet for this repo
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo,
            folder_path=package,
            allow_patterns=ALLOW,
            ignore_patterns=IGNORE,
            commit_message=message,
            repo_type="model",
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = (
            "check the token's write access (HF_TOKEN / `hf auth login`)"
            if status in (401, 403)
            else "check --repo and try again"
        )
        raise DuomemError(f"the Hub refused the upload to {repo} (HTTP {status}); {hint}")
    except (transport_error(), OSError) as e:
        raise DuomemError(
            f"cannot reach the Hub at {api.endpoint} ({type(e).__name__}); check the network or HF_ENDPOINT"
        )
    print(f"uploaded {len(files)} files ({sum(s for _, s in files) / 1e6:.2f} MB) to {info.commit_url}")
    return files
