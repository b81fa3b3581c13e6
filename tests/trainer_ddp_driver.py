"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: a user's own transformers.Trainer
script with GreenTrainerCallback on two gloo processes. Each process writes what it trained."""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from test_training import make_tiny, tiny_trainer  # noqa: E402
from greentrainer.callback import GreenTrainerCallback  # noqa: E402


def main(out: str, accum: int, warmup: int | None) -> None:
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = GreenTrainerCallback(rho=0.7, full_warmup_steps=warmup, log=lambda *a: None)
    trainer = tiny_trainer(model, out, 32, [], per_device_train_batch_size=2, gradient_accumulation_steps=accum,
                           ddp_backend="gloo")
    cb.attach(trainer)
    trainer.train()
    rank = int(os.environ["RANK"])
    digest = hashlib.sha256()
    for n, p in sorted(model.named_parameters()):
        digest.update(n.encode() + p.detach().numpy().tobytes())
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"digest": digest.hexdigest(), "changed": changed, "flops": cb.flops,
                   "selections": [s["selected"] for s in cb.selections], "steps": trainer.state.global_step,
                   "kinds": [s["kind"] for s in cb.selections],
                   "report": {k: v for k, v in cb.report.items() if k != "energy"}}, f)
    import torch.distributed as dist
    if dist.is_initialized():  # leave together, then exit at once: torch's teardown of a gloo run can abort
        dist.barrier()         # ("terminate called without an active exception") after the work is done
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), None if sys.argv[3] == "default" else int(sys.argv[3]))
