"""Sharded training (``--fsdp``): torch's FSDP2 (``fully_shard``) over each decoder layer and the root, applied by
the loop after the method has wrapped the model, so LoRA adapters and the trainable set it chooses are sharded
like every other tensor.

FSDP2 keeps one DTensor per parameter (each process holds a slice), all-gathers a layer's tensors for its
forward and backward and reduce-scatters the gradients of the tensors that require grad *at that backward*: a
trainable set that changes between steps needs nothing else (a frozen tensor gets no gradient and no
optimizer state). Gradients are summed, not averaged, because the loop weights each micro-batch's loss by its
share of the global batch's target tokens. What is new here: checkpoints through ``torch.distributed.checkpoint``
(weights and the optimizer state of the tensors that have one, keyed by name, so a run resumes on another number
of processes) and the merged model for saving. Tensors a method installs after sharding (SMT's l×l blocks) are
not FSDP's: they stay whole on every process and the loop sums their gradients itself. The per-process view of
a sharded tensor that the probe, SMT and the finiteness checks work on is :mod:`greentrainer.shards`."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from ..shards import local

SHARDS = "shards"  # the checkpoint folder's DCP sub-folder


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def decoder_layers(model) -> list:
    """The modules sharded one by one: transformers' ``_no_split_modules`` classes (the decoder layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model, log=print):
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, output head); gradients are
    summed over processes (divide factor 1). Returns the model (the same object, now an FSDP module)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=True)  # (else a no-grad forward leaves the root's tensors gathered
    for m in model.modules():                       # and registered in place of the sharded ones)
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain sums (gloo has no pre-multiplied sum)
    n = sum(p.numel() for p in model.parameters())
    mine = sum(local(p).numel() for p in model.parameters())
    log(f"FSDP2: {len(layers)} decoder layers and the root sharded; this process holds {mine / 1e6:.1f}M of "
        f"{n / 1e6:.1f}M parameters")
    return model


def check_sharding(cfg, deselected_state: str | None) -> None:
    """What --fsdp cannot do yet, refused in one line before anything is written."""
    if cfg.precision == "16-mixed":
        raise UsageError("--fsdp does not work with --precision 16-mixed (its gradient scaler is not shard-aware); "
                         "use bf16-mixed or bf16-true")
    if deselected_state == "cpu":
        raise UsageError("--fsdp does not work with --deselected-state cpu; use drop (the default) or keep")


# -- checkpoints ------------------------------------------------------------------------------------------
def optimizer_layout(model, optimizer) -> tuple[dict, dict]:
    """(sharded state to save, its layout): each tensor's optimizer state by parameter name; the layout (plain
    Python, in state.pt) says which states exist and how to rebuild them for loading."""
    from torch.distributed.tensor import DTensor
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, layout = {}, {}
    for p, st in optimizer.state.items():
        n = names[id(p)]
        tensors[n], layout[n] = {}, {}
        for k, v in st.items():
            if isinstance(v, DTensor):
                tensors[n][k] = v
                layout[n][k] = ["like_param", str(v.dtype).removeprefix("torch.")]
            elif isinstance(v, torch.Tensor):
                tensors[n][k] = v
                layout[n][k] = ["tensor", list(v.shape), str(v.dtype).removeprefix("torch."), str(v.device)]
            else:
                layout[n][k] = ["value", v]
    return tensors, layout


def save_sharded(path: Path, model, optimizer) -> dict:
    """Every process writes its slices of the weights and optimizer state into ``path`` (a DCP folder); returns
    what state.pt must hold to read them back (the optimizer's layout)."""
    import torch.distributed.checkpoint as dcp
    tensors, layout = optimizer_layout(model, optimizer)
    dcp.save({"model": model.state_dict(), "optimizer": tensors}, checkpoint_id=str(path))
    return {"optimizer_layout": layout, "param_groups": optimizer.state_dict()["param_groups"]}


def load_sharded(path: Path, model, optimizer, info: dict) -> None:
    """Read a :func:`save_sharded` folder into the model and optimizer, whatever number of processes wrote it."""
    import torch.distributed.checkpoint as dcp
    params = dict(model.named_parameters())
    template, values = {}, {}
    for n, keys in info["optimizer_layout"].items():
        if n not in params:
            raise UsageError(f"the checkpoint has optimizer state for {n}, which this model does not have")
        template[n], values[n] = {}, {}
        for k, spec in keys.items():
            if spec[0] == "like_param":
                template[n][k] = torch.zeros_like(params[n].detach(), dtype=getattr(torch, spec[1]))
            elif spec[0] == "tensor":
                template[n][k] = torch.zeros(spec[1], dtype=getattr(torch, spec[2]), device=spec[3])
            else:
                values[n][k] = spec[1]
    weights = model.state_dict()
    dcp.load({"model": weights, "optimizer": template}, checkpoint_id=str(path))
    model.load_state_dict(weights)
    optimizer.load_state_dict({"state": {}, "param_groups": info["param_groups"]})
    for n, st in template.items():
        optimizer.state[params[n]] = {**st, **values[n]}


# -- the merged model -----------------------------------------------------------------------------------
def gather_on_main(model, main: bool) -> None:
    """Every process takes part; afterwards the first process's ``model`` holds ordinary full tensors (it can be
    saved as an ordinary folder, though not run: its FSDP hooks remain), the others' are unchanged."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    plain: dict = {}
    for module in model.modules():
        for leaf, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in plain:
                    plain[id(p)] = torch.nn.Parameter(full[names[id(p)]], requires_grad=p.requires_grad)
                module._parameters[leaf] = plain[id(p)]
