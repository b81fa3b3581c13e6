"""Per-tensor backward FLOPs profile (GreenTrainer §3.1), derived from the model itself.

One forward and one backward pass with every tensor trainable, on the ``meta`` device (no weights, no
memory), under a dispatch mode that counts FLOPs with torch's own formulas (``FlopCounterMode``'s
registry). Every counted backward op is attributed to the autograd edge whose gradient it produces, and
every edge knows the set of tensors it leads to. An edge that leads to one tensor only is that tensor's
weight-gradient work (``t_dw``); any other edge is activation-gradient work, charged (``t_dy``) to the
shallowest tensor it leads to, because that is the first selection depth that makes it necessary.

This makes Eq. 5 of the paper, ``t_fp + Σ_{i∈S} t_dw[i] + Σ_{j≤deepest(S)} t_dy[j]``, exact along the
main gradient path and a conservative upper bound where sibling branches meet (Q/K/V fed by one input;
T5's cross-attention K/V feeding the encoder): a branch's work is needed only when one of its own tensors
is selected or the gradient must pass its join point. The profile records those ``branches`` (work,
tensors, join), and :func:`greentrainer.selection.selection_cost` uses them to make the prediction exact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (FlopCounterMode, bmm_flop, flop_registry, register_flop_formula,
                                      sdpa_flop_count, shape_wrapper)

from .files import write_text_atomic

aten = torch.ops.aten

#: The attention implementations a model may be built with; both are counted alike (see the module docstring).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def _sdpa_forward_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and PV, 2·b·h_q·s_q·s_k·d each (GQA: key/value heads broadcast to the query's), as eager counts."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _needed_input_grads(n: int = 3) -> tuple[bool, ...]:
    """Which of the first ``n`` inputs (query, key, value) of the autograd node now running need a gradient
    (its edge is valid); all of them when no node runs (the op was called outside the autograd engine)."""
    node = torch._C._current_autograd_node()
    if node is None:
        return (True,) * n
    edges = node.next_functions
    return tuple(i >= len(edges) or edges[i][0] is not None for i in range(n))


def sdpa_backward_parts(grad_out_shape, query_shape, key_shape, value_shape,
                        needs=(True, True, True)) -> list[tuple[int, tuple[int, ...]]]:
    """Eager attention's backward matmuls, as (FLOPs, inputs whose gradient they serve): dP = dO·Vᵀ for
    query and key, dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dO; only those the ``needs`` (query, key, value) call for."""
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    sdpa_flop_count(query_shape, key_shape, value_shape)  # validates the shapes (GQA included)
    if tuple(grad_out_shape) != (b, h, s_q, d_v):
        raise AssertionError(f"sdpa backward: grad_out {tuple(grad_out_shape)} does not match the output "
                             f"{(b, h, s_q, d_v)}")
    bh = b * h
    parts = []
    if needs[0] or needs[1]:
        parts.append((bmm_flop((bh, s_q, d_v), (bh, d_v, s_k)), (0, 1)))
    if needs[0]:
        parts.append((bmm_flop((bh, s_q, s_k), (bh, s_k, d_q)), (0,)))
    if needs[1]:
        parts.append((bmm_flop((bh, d_q, s_q), (bh, s_q, s_k)), (1,)))
    if needs[2]:
        parts.append((bmm_flop((bh, s_k, s_q), (bh, s_q, d_v)), (2,)))
    return parts


def _sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                        **kwargs) -> int:
    """Eager attention's backward matmuls for the gradients the running autograd node needs (all four,
    twice the forward, when query, key and value all need one)."""
    return sum(f for f, _ in sdpa_backward_parts(grad_out_shape, query_shape, key_shape, value_shape,
                                                 _needed_input_grads()))


# Every SDPA backward kernel takes (grad_out, query, key, value, ...) and every forward (query, key, value, ...),
# all shaped (batch, heads, seq, head_dim).
_SDPA_FORWARD = (aten._scaled_dot_product_flash_attention_for_cpu,)
_SDPA_BACKWARD = (aten._scaled_dot_product_flash_attention_for_cpu_backward,
                  aten._scaled_dot_product_flash_attention_backward,
                  aten._scaled_dot_product_efficient_attention_backward,
                  aten._scaled_dot_product_cudnn_attention_backward)


def _raw(formula):
    f = shape_wrapper(formula)
    f._get_raw = True  # FlopCounterMode's custom_mapping: already takes tensors
    return f


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """Mixture-of-experts' grouped matmul (transformers' default experts kernel): every token-expert pair's rows
    once, as a loop over the experts would multiply them. Forward and input gradient: (S, K) by each expert's
    (K, N) over S = tokens × top-k rows; weight gradient: (K, S) by (S, N) into each expert's (K, N). The rows
    are read from the shapes: all S rows are real (no expert-parallel padding), whatever the routing."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


#: Our formulas, over torch's registry: the CPU SDPA kernels (absent there), eager-equivalent SDPA backwards and
#: the grouped matmul of mixture-of-experts layers (absent there).
FLOP_OVERRIDES = {**{op: _raw(_sdpa_forward_flop) for op in _SDPA_FORWARD},
                  **{op: _raw(_sdpa_backward_flop) for op in _SDPA_BACKWARD},
                  aten._grouped_mm: _raw(_grouped_mm_flop)}

# Plain FlopCounterMode users count the CPU kernels too (torch's registry has nothing for them).
for _op, _f in ((aten._scaled_dot_product_flash_attention_for_cpu, _sdpa_forward_flop),
                (aten._scaled_dot_product_flash_attention_for_cpu_backward, _sdpa_backward_flop),
                (aten._grouped_mm, _grouped_mm_flop)):
    if _op not in flop_registry:
        register_flop_formula(_op)(_f)


def flop_formula(packet):
    """The FLOPs formula used for an op overload packet (ours first, then torch's), or None."""
    return FLOP_OVERRIDES.get(packet) or flop_registry.get(packet)


def flop_counter_mode() -> FlopCounterMode:
    """torch's FlopCounterMode with our formulas (see :data:`FLOP_OVERRIDES`)."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_OVERRIDES)


@dataclasses.dataclass
class TensorFlops:
    name: str
    t_dw: int
    t_dy: int
    numel: int = 0


@dataclasses.dataclass
class Branch:
    """Activation-gradient work needed only if one of ``tensors`` is selected or the deepest selected tensor
    lies at or below ``joins`` (``joins`` equal to the profile's tensor count: it never joins). Eq. 5's chain
    charges it to ``t_dy[min(tensors)]``, i.e. as soon as the deepest selected tensor reaches the branch."""

    flops: int
    tensors: list[int]
    joins: int


@dataclasses.dataclass
class TensorFlopsProfile:
    """Trainable tensors in backward order (index 0 nearest the output)."""

    t_fp: int
    t_full: int
    tensors: list[TensorFlops]
    batch_size: int = 0
    seq_len: int = 0
    target_len: int = 0
    branches: list[Branch] = dataclasses.field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def t_bp(self) -> int:
        return self.t_full - self.t_fp

    @property
    def t_dws(self) -> list[int]:
        return [t.t_dw for t in self.tensors]

    @property
    def t_dys(self) -> list[int]:
        return [t.t_dy for t in self.tensors]

    @property
    def branch_tuples(self) -> list[tuple[int, tuple[int, ...], int]]:
        """Branches as (flops, tensor indices, join index), the form the selector takes."""
        return [(b.flops, tuple(b.tensors), b.joins) for b in self.branches]

    @functools.cached_property
    def single_costs(self) -> list[int]:
        """Backward FLOPs of training each tensor alone."""
        from .selection import single_costs
        return single_costs(self.t_dws, self.t_dys, self.branch_tuples)

    def indices(self, selected) -> list[int]:
        index = {t.name: i for i, t in enumerate(self.tensors)}
        return sorted({index[s] if isinstance(s, str) else int(s) for s in selected})

    def predict(self, selected, exact: bool = True) -> int:
        """Step FLOPs (forward + backward) predicted for a selection of tensor indices or names: Eq. 5, with
        sibling branches paid only when needed (``exact=False``: the paper's pure chain, an upper bound)."""
        from .selection import selection_cost
        return self.t_fp + selection_cost(self.t_dws, self.t_dys, self.indices(selected),
                                          self.branch_tuples if exact else ())

    def to_json(self) -> dict:
        return {"t_fp": self.t_fp, "t_full": self.t_full, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "target_len": self.target_len,
                "tensors": [dataclasses.asdict(t) for t in self.tensors],
                "branches": [dataclasses.asdict(b) for b in self.branches]}

    @classmethod
    def from_json(cls, d: dict) -> "TensorFlopsProfile":
        return cls(t_fp=d["t_fp"], t_full=d["t_full"], batch_size=d.get("batch_size", 0),
                   seq_len=d.get("seq_len", 0), target_len=d.get("target_len", 0),
                   tensors=[TensorFlops(**t) for t in d["tensors"]],
                   branches=[Branch(**b) for b in d.get("branches", [])])


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
        formula = flop_formula(packet)
        if formula is not None:
            self.record(int(formula(*args, **kwargs, out_val=out)), out, packet, args)
        return out

    def record(self, flops: int, out, packet=None, args=()) -> None:
        self.total += flops


class _AttributingCounter(FlopCounter):
    """Also remembers, per autograd node being executed, the (FLOPs, output numel) of its ops."""

    def __init__(self):
        super().__init__()
        self.current = None          # node now running in backward
        self.per_node: dict[int, list[tuple[int, int]]] = {}
        self.unattributed = 0

    def record(self, flops, out, packet=None, args=()):
        super().record(flops, out, packet, args)
        if self.current is None:
            self.unattributed += flops
        elif packet in _SDPA_BACKWARD and flops:
            # One kernel, three gradients: each matmul goes to the inputs (node edges) it serves, as eager's would.
            parts = sdpa_backward_parts(*(a.shape for a in args[:4]), _needed_input_grads())
            assert sum(f for f, _ in parts) == flops
            self.per_node.setdefault(self.current, []).extend(parts)
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


def profile_model(model, batch_size: int, seq_len: int, target_len: int | None = None,
                  candidates=None) -> TensorFlopsProfile:
    """Profile a model (on any device; a meta copy costs nothing). Leaves requires_grad as it was.
    ``candidates``: the names of the tensors that may train (default: all); the rest stay frozen, so the
    profile is over those alone (e.g. a LoRA model's adapters, with the base chain they force)."""
    everything = unique_named_parameters(model)
    keep = {n for n, _ in everything} if candidates is None else set(candidates)
    params = [(n, p) for n, p in everything if n in keep]
    device = everything[0][1].device
    with trainable_exactly(everything, keep):
        batch = dummy_batch(model, batch_size, seq_len, target_len, device=device)
        with flop_counter_mode() as fc, meta_safe(model):
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
    branches: dict[tuple[int, int], int] = {}
    charge = lambda mask, flops: _charge(mask, flops, t_dw, t_dy, branches, len(order))  # noqa: E731
    for node in nodes:
        ops = counter.per_node.get(id(node))
        if not ops:
            continue
        edges = [reach.get(id(nxt), 0) if nxt is not None else 0 for nxt, _ in node.next_functions]
        numels = edge_numels.get(id(node), [-1] * len(edges))
        live = [i for i, m in enumerate(edges) if m and numels[i] != -1]
        used: dict[int, int] = {}
        for flops, numel in ops:
            if isinstance(numel, tuple):  # (FLOPs, the inputs whose gradient it serves): a fused kernel's part
                mask = functools.reduce(int.__or__, (edges[i] for i in numel if i < len(edges)), 0)
                if mask:
                    charge(mask, flops)
                    continue
            if not live:
                continue
            match = [i for i in live if numels[i] == numel]
            if match:
                i = min(match, key=lambda k: used.get(k, 0))
                used[i] = used.get(i, 0) + 1
                charge(edges[i], flops)
            else:  # no shape match: split evenly over the live edges
                share = flops // len(live)
                for j, i in enumerate(live):
                    charge(edges[i], share + (flops - share * len(live) if j == 0 else 0))
    numel_of = {n: p.numel() for n, p in params}
    tensors = [TensorFlops(n, t_dw[i], t_dy[i], numel_of[n]) for i, n in enumerate(order)]
    t_full = t_fp + counter.total
    branch_list = [Branch(f, [i for i in range(len(order)) if g >> i & 1], b)
                   for (g, b), f in sorted(branches.items(), key=lambda kv: ((kv[0][0] & -kv[0][0]), kv[0][1]))]
    prof = TensorFlopsProfile(t_fp=t_fp, t_full=t_full, tensors=tensors, batch_size=batch_size,
                              seq_len=seq_len, target_len=target_len or 0, branches=branch_list)
    assert sum(t.t_dw + t.t_dy for t in tensors) + counter.unattributed == counter.total
    if counter.unattributed:  # work outside any node (rare): pay it with the first tensor
        tensors[0].t_dy += counter.unattributed
    return prof


def _charge(mask: int, flops: int, t_dw: list[int], t_dy: list[int], branches: dict, n: int) -> None:
    """Attribute work whose gradient leads to the tensors in ``mask`` (bits = backward positions)."""
    low = (mask & -mask).bit_length() - 1
    if mask & (mask - 1) == 0:
        t_dw[low] += flops
        return
    t_dy[low] += flops  # Eq. 5's chain: needed once the deepest selected tensor reaches ``low``
    joins = (((1 << n) - 1) & ~mask).bit_length()  # every tensor from ``joins`` down is reached
    group = mask & ((1 << joins) - 1)
    if group:  # a side branch: needed only for its own tensors, or below ``joins``
        branches[(group, joins)] = branches.get((group, joins), 0) + flops


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
        with flop_counter_mode() as fc, meta_safe(model):
            loss = model(**batch).loss
            if loss.requires_grad:
                loss.backward()
        return int(fc.get_total_flops())


def meta_model_from_config(config, attn_implementation: str = "eager"):
    """Build a weightless copy of a model on the meta device from its config.

    Eager attention by default: SDPA is counted alike (module docstring), so the profile and the full-FT
    reference of an SDPA model are the same as its eager copy's.
    """
    import copy
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    config = copy.deepcopy(config)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    experts = {"experts_implementation": "batched_mm"} if is_moe(config) else {}
    with torch.device("meta"):
        return cls.from_config(config, attn_implementation=attn_implementation, **experts)


def is_moe(config) -> bool:
    """A mixture-of-experts model: its experts run through transformers' experts kernels."""
    return any(getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def supports_sdpa(config) -> bool:
    """Whether transformers has an SDPA attention for this config's model class (else only eager)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        cls = auto._model_mapping[type(config)]
    except KeyError:
        return False
    return bool(getattr(cls, "_supports_sdpa", False))


def _cache_dir() -> Path:
    root = os.environ.get("GREENTRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "greentrainer")
    return Path(root) / "profiles"


def profile_config(config, batch_size: int, seq_len: int, target_len: int | None = None,
                   cache: bool = True) -> TensorFlopsProfile:
    """Profile from a config alone (meta device), cached per config and batch shape."""
    key = hashlib.sha256(json.dumps([config.to_json_string(use_diff=False), batch_size, seq_len,
                                     target_len, torch.__version__, 2]).encode()).hexdigest()[:24]
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
            write_text_atomic(path, json.dumps(prof.to_json()))
        except OSError:
            pass
    return prof


def full_step_flops(meta_model, batch: dict) -> int:
    """FLOPs of a full fine-tuning step on a batch of this shape, measured on a weightless copy."""
    ids, labels = batch["input_ids"], batch["labels"]
    seq2seq = getattr(meta_model.config, "is_encoder_decoder", False)
    return measure_step_flops(meta_model, [n for n, _ in unique_named_parameters(meta_model)],
                              ids.shape[0], ids.shape[1], labels.shape[1] if seq2seq else None)


# ---------------------------------------------------------------- activation (gradient) checkpointing

def checkpointed_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """The repeated blocks transformers checkpoints (``GradientCheckpointingLayer``), in forward order."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]


def layer_forward_flops(meta_model, batch_size: int, seq_len: int, target_len: int | None = None) -> dict:
    """Forward FLOPs of each checkpointed block (what its recompute costs in the backward), on the meta device."""
    layers = checkpointed_layers(meta_model)
    counts, hooks = {}, []
    for name, module in layers:
        def pre(mod, args, _n=name):
            mod._gt_counter = FlopCounter()
            mod._gt_counter.__enter__()

        def post(mod, args, out, _n=name):
            mod._gt_counter.__exit__(None, None, None)
            counts[_n] = counts.get(_n, 0) + mod._gt_counter.total
        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        batch = dummy_batch(meta_model, batch_size, seq_len, target_len)
        with torch.no_grad(), meta_safe(meta_model):
            meta_model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return counts


def with_recompute(profile: TensorFlopsProfile, meta_model, layer_flops: dict) -> TensorFlopsProfile:
    """The profile under activation checkpointing: a block is recomputed in the backward whenever the
    backward reaches it, i.e. whenever the deepest selected tensor is its first tensor in backward order or
    lies below, so its forward FLOPs join that tensor's ``t_dy``; full fine-tuning recomputes every block.
    A block none of whose tensors is profiled (a candidate profile: LoRA adapters on some layers only) is
    recomputed when the backward goes below it, so its FLOPs join the next profiled tensor below it.
    ``layer_flops``: each block's forward FLOPs, in forward order (:func:`layer_forward_flops`)."""
    import copy
    prof = copy.deepcopy(profile)
    index = {n: i for i, n in enumerate(prof.names)}
    names = [n for n, _ in unique_named_parameters(meta_model) if n in index]
    owned, pending = set(), 0
    for layer in reversed(list(layer_flops)):  # from the top block down, as the backward meets them
        own = [index[n] for n in names if n.startswith(layer + ".")]
        owned.update(own)
        pending += layer_flops[layer]
        if own:
            prof.tensors[min(own)].t_dy += pending
            pending = 0
    below = range(max(owned) + 1, len(prof.names)) if owned else ()  # tensors under every block
    if pending and below:  # blocks with nothing profiled at the bottom, and a tensor below them (an embedding)
        prof.tensors[min(below)].t_dy += pending
    prof.t_full += sum(layer_flops.values())
    prof.__dict__.pop("single_costs", None)  # cached on the copied profile
    return prof
