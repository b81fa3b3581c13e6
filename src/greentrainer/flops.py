"""Per-tensor backward FLOPs profile (GreenTrainer §3.1), derived from the model itself.

One forward and one backward pass with every tensor trainable, on the ``meta`` device (no weights, no
memory), under a dispatch mode that counts FLOPs with torch's own formulas (``FlopCounterMode``'s
registry). Every counted backward op is attributed to the autograd edge whose gradient it produces, and
every edge knows the set of tensors it leads to. An edge that leads to one tensor only is that tensor's
weight-gradient work (``t_dw``); any other edge is activation-gradient work, charged (``t_dy``) to the
shallowest tensor it leads to, because that is the first selection depth that makes it necessary.

This makes Eq. 5 of the paper, ``t_fp + Σ_{i∈S} t_dw[i] + Σ_{j≤deepest(S)} t_dy[j]``, exact along the
main gradient path and a conservative upper bound where sibling branches (Q/K/V) meet: it never under-
predicts, so a selection the selector accepts never exceeds its budget.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry


@dataclasses.dataclass
class TensorFlops:
    name: str
    t_dw: int
    t_dy: int
    numel: int = 0


@dataclasses.dataclass
class TensorFlopsProfile:
    """Trainable tensors in backward order (index 0 nearest the output)."""

    t_fp: int
    t_full: int
    tensors: list[TensorFlops]
    batch_size: int = 0
    seq_len: int = 0
    target_len: int = 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def t_bp(self) -> int:
        return self.t_full - self.t_fp

    def predict(self, selected) -> int:
        """Step FLOPs (forward + backward) predicted for a selection of tensor indices or names (Eq. 5)."""
        index = {t.name: i for i, t in enumerate(self.tensors)}
        idx = sorted({index[s] if isinstance(s, str) else int(s) for s in selected})
        if not idx:
            return self.t_fp
        deepest = idx[-1]
        return (self.t_fp + sum(self.tensors[i].t_dw for i in idx)
                + sum(t.t_dy for t in self.tensors[: deepest + 1]))

    def to_json(self) -> dict:
        return {"t_fp": self.t_fp, "t_full": self.t_full, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "target_len": self.target_len,
                "tensors": [dataclasses.asdict(t) for t in self.tensors]}

    @classmethod
    def from_json(cls, d: dict) -> "TensorFlopsProfile":
        return cls(t_fp=d["t_fp"], t_full=d["t_full"], batch_size=d.get("batch_size", 0),
                   seq_len=d.get("seq_len", 0), target_len=d.get("target_len", 0),
                   tensors=[TensorFlops(**t) for t in d["tensors"]])


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of the ops actually executed (torch's FlopCounterMode formulas), cheaply.

    Used around every forward, backward and overhead pass of training; accumulates into ``total``.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.record(int(flop_registry[packet](*args, **kwargs, out_val=out)), out)
        return out

    def record(self, flops: int, out) -> None:
        self.total += flops


class _AttributingCounter(FlopCounter):
    """Also remembers, per autograd node being executed, the (FLOPs, output numel) of its ops."""

    def __init__(self):
        super().__init__()
        self.current = None          # node now running in backward
        self.per_node: dict[int, list[tuple[int, int]]] = {}
        self.unattributed = 0

    def record(self, flops, out):
        super().record(flops, out)
        if self.current is None:
            self.unattributed += flops
        else:
            numel = out.numel() if isinstance(out, torch.Tensor) else -1
            self.per_node.setdefault(self.current, []).append((flops, numel))


def dummy_batch(model, batch_size: int, seq_len: int, target_len: int | None = None, device="meta"):
    """Inputs and labels of the given shape, for profiling or measuring a training step."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    if getattr(model.config, "is_encoder_decoder", False):
        t = target_len or seq_len
        return {"input_ids": ids, "labels": torch.zeros(batch_size, t, dtype=torch.long, device=device)}
    return {"input_ids": ids, "labels": ids}


@contextlib.contextmanager
def meta_safe(model):
    """Skip transformers' data-dependent padding check (it reads values, which meta tensors lack)."""
    cfg = model.config
    pad, cache = getattr(cfg, "pad_token_id", None), getattr(cfg, "use_cache", None)
    if not getattr(cfg, "is_encoder_decoder", False):
        cfg.pad_token_id = None
        cfg.use_cache = True  # with a cache object, the packed-sequence check (value-dependent) is skipped
    try:
        yield
    finally:
        cfg.pad_token_id, cfg.use_cache = pad, cache


@contextlib.contextmanager
def trainable_exactly(params, names):
    """Make exactly ``names`` of ``params`` (name, tensor pairs) require grad; restore flags, drop grads after."""
    saved = [p.requires_grad for _, p in params]
    try:
        for n, p in params:
            p.requires_grad_(n in names)
        yield
    finally:
        for (_, p), rg in zip(params, saved):
            p.requires_grad_(rg)
            p.grad = None


def unique_named_parameters(model):
    """Named parameters with tied tensors reported once (the first name wins)."""
    seen, out = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        out.append((name, p))
    return out


def _collect_graph(root):
    nodes, stack, seen = [], [root], {id(root)}
    while stack:
        n = stack.pop()
        nodes.append(n)
        for nxt, _ in n.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
    return nodes


def profile_model(model, batch_size: int, seq_len: int, target_len: int | None = None) -> TensorFlopsProfile:
    """Profile a model (on any device; a meta copy costs nothing). Leaves requires_grad as it was."""
    params = unique_named_parameters(model)
    device = params[0][1].device
    with trainable_exactly(params, {n for n, _ in params}):
        batch = dummy_batch(model, batch_size, seq_len, target_len, device=device)
        with FlopCounterMode(display=False) as fc, meta_safe(model):
            loss = model(**batch).loss
        t_fp = int(fc.get_total_flops())
        nodes = _collect_graph(loss.grad_fn)
        name_of = {id(p): n for n, p in params}
        counter = _AttributingCounter()
        edge_numels: dict[int, list[int]] = {}
        acc_order: list[str] = []
        handles = []
        for node in nodes:
            var = getattr(node, "variable", None)
            if var is not None:  # AccumulateGrad: a leaf tensor
                def pre(grads, _name=name_of.get(id(var))):
                    if _name is not None:
                        acc_order.append(_name)
                handles.append(node.register_prehook(pre))
                continue

            def pre(grads, _id=id(node)):
                counter.current = _id

            def post(grad_inputs, grad_outputs, _id=id(node)):
                edge_numels[_id] = [g.numel() if isinstance(g, torch.Tensor) else -1 for g in grad_inputs]
                counter.current = None
            handles.append(node.register_prehook(pre))
            handles.append(node.register_hook(post))
        with counter:
            loss.backward()
        for h in handles:
            h.remove()

    # Backward order: the order the engine reached each tensor's AccumulateGrad.
    order = list(dict.fromkeys(acc_order))
    pos = {n: i for i, n in enumerate(order)}
    reach: dict[int, int] = {}  # node id -> bitmask over backward positions
    for node in reversed(_topo_order(nodes)):
        var = getattr(node, "variable", None)
        if var is not None:
            name = name_of.get(id(var))
            reach[id(node)] = (1 << pos[name]) if name in pos else 0
        else:
            m = 0
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    m |= reach.get(id(nxt), 0)
            reach[id(node)] = m

    t_dw = [0] * len(order)
    t_dy = [0] * len(order)
    for node in nodes:
        ops = counter.per_node.get(id(node))
        if not ops:
            continue
        edges = [reach.get(id(nxt), 0) if nxt is not None else 0 for nxt, _ in node.next_functions]
        numels = edge_numels.get(id(node), [-1] * len(edges))
        live = [i for i, m in enumerate(edges) if m and numels[i] != -1]
        if not live:
            continue
        used: dict[int, int] = {}
        for flops, numel in ops:
            match = [i for i in live if numels[i] == numel]
            if match:
                i = min(match, key=lambda k: used.get(k, 0))
                used[i] = used.get(i, 0) + 1
                _charge(edges[i], flops, t_dw, t_dy)
            else:  # no shape match: split evenly over the live edges
                share = flops // len(live)
                for j, i in enumerate(live):
                    _charge(edges[i], share + (flops - share * len(live) if j == 0 else 0), t_dw, t_dy)
    numel_of = {n: p.numel() for n, p in params}
    tensors = [TensorFlops(n, t_dw[i], t_dy[i], numel_of[n]) for i, n in enumerate(order)]
    t_full = t_fp + counter.total
    prof = TensorFlopsProfile(t_fp=t_fp, t_full=t_full, tensors=tensors, batch_size=batch_size,
                              seq_len=seq_len, target_len=target_len or 0)
    assert sum(t.t_dw + t.t_dy for t in tensors) + counter.unattributed == counter.total
    if counter.unattributed:  # work outside any node (rare): pay it with the first tensor
        tensors[0].t_dy += counter.unattributed
    return prof


def _charge(mask: int, flops: int, t_dw: list[int], t_dy: list[int]) -> None:
    low = (mask & -mask).bit_length() - 1
    if mask & (mask - 1) == 0:
        t_dw[low] += flops
    else:
        t_dy[low] += flops


def _topo_order(nodes):
    """Nodes ordered so that every node comes before the nodes it points to."""
    by_id = {id(n): n for n in nodes}
    indeg = {id(n): 0 for n in nodes}
    for n in nodes:
        for nxt, _ in n.next_functions:
            if nxt is not None:
                indeg[id(nxt)] += 1
    ready = [n for n in nodes if indeg[id(n)] == 0]
    out = []
    while ready:
        n = ready.pop()
        out.append(n)
        for nxt, _ in n.next_functions:
            if nxt is not None:
                indeg[id(nxt)] -= 1
                if indeg[id(nxt)] == 0:
                    ready.append(by_id[id(nxt)])
    return out


def measure_step_flops(model, selected_names, batch_size: int, seq_len: int, target_len: int | None = None):
    """FLOPs FlopCounterMode measures for one forward+backward with exactly ``selected_names`` trainable."""
    params = unique_named_parameters(model)
    with trainable_exactly(params, set(selected_names)):
        batch = dummy_batch(model, batch_size, seq_len, target_len, device=params[0][1].device)
        with FlopCounterMode(display=False) as fc, meta_safe(model):
            loss = model(**batch).loss
            if loss.requires_grad:
                loss.backward()
        return int(fc.get_total_flops())


def meta_model_from_config(config):
    """Build a weightless copy of a model on the meta device from its config (eager attention)."""
    import copy
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    config = copy.deepcopy(config)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config, attn_implementation="eager")


def _cache_dir() -> Path:
    root = os.environ.get("GREENTRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "greentrainer")
    return Path(root) / "profiles"


def profile_config(config, batch_size: int, seq_len: int, target_len: int | None = None,
                   cache: bool = True) -> TensorFlopsProfile:
    """Profile from a config alone (meta device), cached per config and batch shape."""
    key = hashlib.sha256(json.dumps([config.to_json_string(use_diff=False), batch_size, seq_len,
                                     target_len, torch.__version__, 1]).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{key}.json"
    if cache and path.exists():
        try:
            return TensorFlopsProfile.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass
    prof = profile_model(meta_model_from_config(config), batch_size, seq_len, target_len)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(prof.to_json()))
            tmp.replace(path)
        except OSError:
            pass
    return prof


def full_step_flops(meta_model, batch: dict) -> int:
    """FLOPs of a full fine-tuning step on a batch of this shape, measured on a weightless copy."""
    ids, labels = batch["input_ids"], batch["labels"]
    seq2seq = getattr(meta_model.config, "is_encoder_decoder", False)
    return measure_step_flops(meta_model, [n for n, _ in unique_named_parameters(meta_model)],
                              ids.shape[0], ids.shape[1], labels.shape[1] if seq2seq else None)
