"""Memory: this process's peak (sampled RSS on CPU, the allocator's peak on CUDA), and activation checkpointing
that keeps the backward as short as the trainable set."""
from __future__ import annotations

import threading

import torch


class PeakMemory:
    """Peak memory of this process (CPU: resident set sampled every 20 ms; CUDA: allocator peak)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                import os
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self.rss()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


def enable_checkpointing(model) -> None:
    """Activation checkpointing (non-reentrant) that keeps the backward as short as the trainable set:
    transformers makes the embedding output require grad when it enables checkpointing, which would
    run every backward to the bottom; non-reentrant checkpointing does not need it, so it is turned off."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # early_stop=False: a block reached by the backward is recomputed whole, so its cost is known in advance
    # (stopping early saves a little in the deepest block, by an amount that depends on what trains there)
    kwargs = {"use_reentrant": False, "early_stop": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5 (the older name is deprecated)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()
    # it keeps one hook's handle: a hook registered twice (the Trainer enables checkpointing on a peft model,
    # then this) would stay, so every such hook on the input embeddings goes (transformers' and peft's)
    emb = base.get_input_embeddings()
    for key, hook in list(getattr(emb, "_forward_hooks", {}).items()):
        if "make_inputs_require_grad" in getattr(hook, "__qualname__", ""):
            del emb._forward_hooks[key]
    base.config.use_cache = False


def held_bytes(model, optimizer) -> int:
    """Bytes this process holds in weights and optimizer state (with --fsdp: its slices)."""
    from ..shards import local
    params = {id(p): p for p in model.parameters()}
    weights = sum(local(p).numel() * p.element_size() for p in params.values())
    state = sum(local(v).numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                if torch.is_tensor(v))
    return weights + state

