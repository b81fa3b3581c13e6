"""How much of a training step goes to padding, per bundled dataset (issue 33, item 3: the measurement first).

Batches are right-padded to their longest item (rounded up to a multiple of 8, as ``collate`` does), so every
pad token costs forward and backward FLOPs like a real one. For each bundled dataset's training split, tokenised
with the default model's tokenizer in its chat format at the default ``--max-input-length 512``, random
batches of the default size 4 (the mean over 20 shuffles, the loop's draw): the share of tokens that are
padding, and the share of full fine-tuning's FLOPs spent on them. FLOPs of a sequence of length L are
``a·L + c·L²`` (the matmuls grow with tokens, attention with their square), with ``a`` and ``c`` read off two
exact per-shape profiles of the model (meta device), so a padded batch costs B·f(L_max) against Σ f(L_i) for
the same items unpadded; the difference is what padding-free batches (grouping by length, packing) could save.

python bench/padding.py [--quick] [--batch-size 4] [--max-input-length 512]
"""
from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))

DATASETS = ("scitldr", "dialogsum", "samsum", "webquestions", "piqa")


def flops_per_sequence(config):
    """f(L) = a·L + c·L² for one sequence of L tokens, fitted exactly on two profiled lengths."""
    from greentrainer.flops import profile_config
    l1, l2 = 128, 512
    f1, f2 = profile_config(config, 1, l1).t_full, profile_config(config, 1, l2).t_full
    c = (f2 / l2 - f1 / l1) / (l2 - l1)
    a = f1 / l1 - c * l1
    return lambda n: a * n + c * n * n


def measure(name, tok, fmt_for, f, batch_size: int, max_len: int, limit, rounds: int = 20) -> dict:
    from greentrainer.data import DATASETS as SPECS, encode_example, load_examples
    from greentrainer.errors import UsageError
    spec = SPECS[name]
    lens, too_long = [], 0
    for e in load_examples(name, "train", limit, 0, None):
        try:
            lens.append(len(encode_example(e, tok, spec.task, False, max_len, fmt=fmt_for(spec)).input_ids))
        except UsageError:  # prompt and target do not fit: a run at this length refuses the dataset
            too_long += 1
    rng, idx = random.Random(0), list(range(len(lens)))
    real_tok = pad_tok = real_f = pad_f = 0.0
    for _ in range(rounds):
        rng.shuffle(idx)
        for i in range(0, len(idx), batch_size):
            batch = [lens[j] for j in idx[i: i + batch_size]]
            longest = -(-max(batch) // 8) * 8
            real_tok += sum(batch)
            pad_tok += longest * len(batch)
            real_f += sum(f(n) for n in batch)
            pad_f += len(batch) * f(longest)
    return {"dataset": name, "items": len(lens), "items_too_long": too_long, "mean_tokens": sum(lens) / len(lens), "max_tokens": max(lens),
            "padding_%_of_tokens": 100 * (1 - real_tok / pad_tok), "padding_%_of_flops": 100 * (1 - real_f / pad_f),
            "padded_over_unpadded_flops": pad_f / real_f}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SciTLDR's first 64 training items only")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-input-length", type=int, default=512)
    a = ap.parse_args()
    from common import write_results
    from greentrainer.data import resolve_prompt_format
    from greentrainer.models import load_config, load_model
    config = load_config("smollm2-135m")
    _, tok = load_model("smollm2-135m")
    f = flops_per_sequence(config)

    def fmt_for(spec):
        return resolve_prompt_format("auto", tok, False, spec.instruction)
    names, limit = (("scitldr",), 64) if a.quick else (DATASETS, None)
    rows = [measure(n, tok, fmt_for, f, a.batch_size, a.max_input_length, limit) for n in names]
    write_results("padding" + ("_quick" if a.quick else ""),
                  "Padding: the share of tokens and FLOPs right-padded batches spend on pad tokens", rows,
                  ["dataset", "items", "items_too_long", "mean_tokens", "max_tokens", "padding_%_of_tokens", "padding_%_of_flops",
                   "padded_over_unpadded_flops"],
                  notes=f"SmolLM2-135M's tokenizer, chat format, --max-input-length {a.max_input_length}, each "
                        f"dataset's training split, random batches of {a.batch_size} (20 shuffles), padded to the "
                        f"longest item rounded up to 8 as the loop's collate does. FLOPs per sequence "
                        f"f(L) = a·L + c·L², fitted exactly on the model's profiles at 128 and 512 tokens; "
                        f"padded_over_unpadded_flops: what the padded batches cost over the same items without "
                        f"padding (what grouping by length or packing could at best save). items_too_long: items whose "
                        f"prompt and target do not fit --max-input-length (a training run stops on them; left out "
                        f"here).")


if __name__ == "__main__":
    main()
