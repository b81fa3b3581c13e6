"""Run by tests/test_distributed.py, alone or under ``torchrun --nproc_per_node 2``: trains a tiny model with
greentrainer's loop and saves, per process, the final weights, the selections and the FLOPs totals."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny  # noqa: E402
from greentrainer.config import TrainConfig  # noqa: E402
from greentrainer.methods.greentrainer import GreenTrainerConfig  # noqa: E402
from greentrainer.data import Example, encode_all  # noqa: E402
from greentrainer.engine.distributed import build_accelerator  # noqa: E402
from greentrainer.loop import train  # noqa: E402
from greentrainer.methods import build_method  # noqa: E402
from greentrainer.methods.peft_methods import LoraMethodConfig  # noqa: E402
from greentrainer.methods.smt import SMTConfig  # noqa: E402
from greentrainer.models import tiny_tokenizer  # noqa: E402


def main(out: str, method: str, batch_size: int, grad_accum: int, epochs: int, uniform: bool = False,
         fsdp: bool = False) -> None:
    """``uniform``: every item has the same length, so micro-batches pad like whole batches and every
    FLOPs budget is the same whatever the split (the selections can then be compared exactly). ``fsdp``: sharded
    (the saved state is the gathered full one, and each process's optimizer state is recorded)."""
    tok = tiny_tokenizer()
    if uniform:
        exs = [Example(source=f"the quick brown fox {i:02d} jumps over the lazy dog", target=f"fox {i % 3}",
                       targets=["x"]) for i in range(24)]
    else:
        exs = [Example(source=f"the quick brown fox {i} jumps over the lazy dog {'and runs ' * (i % 4)}",
                       target=f"fox {i % 3} {'ran' * (i % 2)}", targets=["x"]) for i in range(24)]
    model = make_tiny("llama")
    data = encode_all(exs, tok, "summarization", False, 64)
    variants = {"greentrainer": GreenTrainerConfig(rho=0.75, full_warmup_steps=0),  # the paper's mechanics
                "greentrainer-warmup": GreenTrainerConfig(rho=0.75),              # the default full FT warm-up
                "greentrainer-blocks": GreenTrainerConfig(rho=0.75, full_warmup_steps=0, over="blocks",
                                                          block_size=16),
                "greentrainer-lora": GreenTrainerConfig(rho=0.75, full_warmup_steps=0, over="lora", lora_dropout=0.0),
                "lora": LoraMethodConfig(lora_dropout=0.0),
                "smt": SMTConfig(warmup_steps=3, block_size=16)}  # (no dropout: its masks depend on the split)
    cfg = TrainConfig(method=method.split("-")[0], epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                      lr=2e-3, seed=0, method_config=variants.get(method), fsdp=fsdp, track_energy=False)
    acc = build_accelerator("cpu")
    m = build_method(cfg)
    from greentrainer.loop import RunHandle
    handle = RunHandle()
    res = train(model, tok, m, data, data[:4], cfg, None, log=lambda *a: None, progress=False, accelerator=acc,
                handle=handle)
    sels = [s["selected"] for s in getattr(m, "selections", [])]
    model = m.finalize(res["model"])  # --over blocks: plain layers again
    opt = {}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor
        names = {id(p): n for n, p in model.named_parameters()}
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        # each tensor's optimizer state: (key, numel held by this process, numel of the whole tensor)
        opt = {names.get(id(p), f"(blocks {i})"):  # (SMT's blocks are merged back: no name)
               [(k, v.to_local().numel() if isinstance(v, DTensor) else v.numel(), v.numel())
                for k, v in st.items() if torch.is_tensor(v) and v.dim()]
               for i, (p, st) in enumerate(handle.optimizer.state.items())}
    else:
        state = model.state_dict()
    torch.save({"state": {k: v.detach().clone() for k, v in state.items()}, "optimizer_state": opt,
                "selections": sels, "totals": res["totals"]}, Path(out) / f"rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():  # then exit at once (torch's teardown of a gloo run can abort)
        torch.distributed.destroy_process_group()
        import os
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), "uniform" in sys.argv[6:],
         "fsdp" in sys.argv[6:])
