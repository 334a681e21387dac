"""duomem-mlx: distil a big agent model into a small, fast one on Apple Silicon.

The Python API (mlx and mlx-lm load with the model, not with this package):

    import duomem_mlx

    agent = duomem_mlx.load("runs/student-4bit")   # a package, or a model + adapter_path= + memory_bank=
    agent.start("Find the coin.", "You are in the kitchen.", admissible=["go north", "open fridge"])
    action = agent.act()                             # "go north": one of the admissible commands
    agent.observe("You are in the hallway.", admissible=["go south", "take coin"])
    action = agent.act()                             # without admissible= the model writes free text

    answer = agent.chat("how do I find a coin?")    # answer.text, answer.memories (ids, texts)
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" noise

from duomem_mlx.api import Agent, Answer, load  # noqa: E402  (light: mlx is imported inside load)
from duomem_mlx.version import __version__  # noqa: E402, F401

__all__ = ["Agent", "Answer", "load"]
