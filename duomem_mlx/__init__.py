"""duomem-mlx: distil a big agent model into a small, fast one on Apple Silicon."""
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" noise

__version__ = "0.1.0"
