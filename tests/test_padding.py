"""--group-by-length: batches of similar length (less padding, fewer FLOPs) with the same global-batch guarantees
(every item once per epoch, the same steps whatever the number of processes, resumable), and the run reports
what full fine-tuning on randomly batched data would have cost."""
import torch

from conftest import make_tiny
from greentrainer.config import TrainConfig
from greentrainer.data import Example, encode_all
from greentrainer.engine.distributed import global_batches
from greentrainer.loop import train
from greentrainer.methods import build_method
from greentrainer.models import tiny_tokenizer

TOK = tiny_tokenizer()


def steps(n, lengths, batch=4, world=1, accum=1, seed=0):
    return [[global_batches(n, batch, world, accum, r, torch.Generator().manual_seed(seed), lengths)[t]
             for r in range(world)] for t in range(-(-n // (batch * world * accum)))]


def test_grouped_batches_keep_every_guarantee_and_pad_less():
    n = 403
    lengths = [int(x) for x in torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(1))]
    one = steps(n, lengths)
    items = [sorted(i for shards in step for m in shards for i in m) for step in steps(n, lengths, 1, world=2, accum=2)]
    flat = [i for step in one for shards in step for m in shards for i in m]
    assert sorted(flat) == list(range(n))  # every item once
    # the same global batches whatever the processes and accumulation (batch 4 = 2 processes × 2 × batch 1)
    assert [sorted(i for shards in step for m in shards for i in m) for step in one] == items
    padded = lambda batches: sum(max(lengths[i] for i in m) * len(m) for b in batches for s in b for m in s if m)  # noqa: E731
    random = steps(n, None)
    assert padded(one) < 0.8 * padded(random)  # here: far less padding
    assert sorted(i for s in random for shards in s for m in shards for i in m) == sorted(flat)


def _data():
    exs = [Example(source="word " * (2 + (i * 7) % 40) + f"fox {i}", target=f"fox {i % 3}", targets=[f"fox {i % 3}"])
           for i in range(48)]
    return encode_all(exs, TOK, "summarization", False, 256)


def _run(group, method="full"):
    from greentrainer.methods.greentrainer import GreenTrainerConfig
    cfg = TrainConfig(method=method, epochs=2, batch_size=4, lr=1e-3, seed=3, group_by_length=group,
                      method_config=GreenTrainerConfig(rho=0.6, select_every=4) if method == "greentrainer" else None)
    out = train(make_tiny("llama"), TOK, build_method(cfg), _data(), [], cfg, torch.device("cpu"),
                log=lambda *a: None, progress=False)
    return out["totals"]


def test_grouping_saves_flops_and_reports_what_random_batches_would_cost():
    plain, grouped = _run(False), _run(True)
    assert grouped["flops_total"] < 0.9 * plain["flops_total"]
    # the same random draw, batched at random: exactly what the ungrouped run's full fine-tuning measured
    assert grouped["flops_full_ft_random_batches"] == plain["flops_full_ft_reference"]
    assert grouped["flops_fraction_of_full"] == 1.0 and grouped["flops_fraction_of_full_random_batches"] < 0.9


def test_greentrainer_keeps_rho_on_grouped_batches():
    t = _run(True, "greentrainer")
    assert t["within_budget"] and t["flops_fraction_of_full"] <= t["flops_allowed_fraction"] + 0.005
