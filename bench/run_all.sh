#!/usr/bin/env bash
# The full benchmark suite (results in bench/results/). Pass --quick for the few-minute smoke version.
# Learning rates: the SciTLDR table sweeps them on the validation split; the other tables reuse its choices
# (full 1e-4, GreenTrainer 3e-4, LoRA 1e-3, SMT 1e-4) so that each runs in one pass. The committed ablation,
# spread and DialogSum tables were made with GreenTrainer at 1e-4, the best of an earlier, narrower grid
# (each results file starts with the exact command that made it).
set -euo pipefail
cd "$(dirname "$0")"
. ../.venv/bin/activate
Q=${1:-}
if [ -z "${SKIP_META:-}" ]; then
  python selector.py $Q
  python flops_accuracy.py $Q
  python time_vs_flops.py $Q
  python prefix_init.py $Q
fi
# the engine and safety: fault table, counting cost, attention, all-reduce, memory
python bad_inputs.py $Q
python counting.py $Q
python attention.py $Q
python smt_memory.py $Q
python memory.py $Q
OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 allreduce.py $Q
if [ "$Q" = "--quick" ]; then
  python methods.py --quick
  exit 0
fi
SWEPT=full=1e-4,greentrainer=3e-4,lora=1e-3,smt=1e-4
[ -n "${SKIP_MAIN:-}" ] || python methods.py --dataset scitldr --max-train 64 --max-eval 24 --epochs 2
python methods.py --dataset scitldr --methods gt0.6,gt0.6:dw,gt0.6:grad,gt0.6:once,gt0.6:every4 --lrs $SWEPT \
  --max-train 64 --max-eval 12 --epochs 2 --name ablations
python methods.py --dataset scitldr --methods full,gt0.5 --lrs $SWEPT --seeds 1,2,3 --max-train 32 --max-eval 12 \
  --epochs 2 --name spread
python methods.py --dataset dialogsum --methods full,lora,smt,gt0.5,gt0.7 --lrs $SWEPT --max-train 32 \
  --max-eval 12 --epochs 2 --max-input-length 384 --name methods_dialogsum
python methods.py --dataset scitldr --methods full,top2,prefix,lora,dora,smt,gt0.5,gt0.6,gt0.7 --lrs all=2e-5 \
  --max-train 64 --max-eval 24 --epochs 2 --name methods_scitldr_lr2e-5
# accuracy you can compare (resumable: one JSON per run under results/accuracy/ and results/learning_speed/)
python learning_speed.py
python accuracy.py --dataset scitldr --stage sweep
python accuracy.py --dataset scitldr --stage final
python accuracy.py --dataset dialogsum --stage final --max-input-length 512 --seeds 1
