"""Datasets, the GreenTrainer paper's prompt formats, truncation and collation with label masking.

Bundled datasets live in ``greentrainer/datasets/<name>/<split>.jsonl.gz`` (licences in its README).
Every record has ``source``, ``target`` and ``targets`` (all references); PIQA adds ``choices``/``label``.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import random
from pathlib import Path

import torch

from .errors import UsageError

DATA_DIR = Path(__file__).parent / "datasets"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: str                 # summarization | qa | piqa
    train_split: str
    eval_split: str           # the test split: final reports only
    max_new_tokens: int
    licence: str
    note: str = ""
    val_split: str | None = None  # None: a fixed part of the train split is held out (see held_out)


DATASETS = {
    "scitldr": DatasetSpec("scitldr", "summarization", "train", "test", 64, "Apache-2.0", val_split="validation"),
    "dialogsum": DatasetSpec("dialogsum", "summarization", "train", "test", 128, "CC BY-NC-SA 4.0 (non-commercial)",
                             val_split="validation"),
    "samsum": DatasetSpec("samsum", "summarization", "validation", "test", 128, "CC BY-NC-ND 4.0 (non-commercial)",
                          "no train split is bundled: trains on validation (less a held-out 10%), evaluates on test"),
    "webquestions": DatasetSpec("webquestions", "qa", "train", "test", 32, "CC-BY 4.0",
                                "validation: a fixed 10% held out of train"),
    "piqa": DatasetSpec("piqa", "piqa", "validation[:-500]", "validation[-500:]", 8, "AFL-3.0",
                        "only the labelled validation split exists: its first 1338 items train (less a held-out "
                        "10% for validation), the last 500 evaluate"),
}
SPLITS = ("train", "validation", "test")

@dataclasses.dataclass
class Example:
    source: str
    target: str
    targets: list[str]
    choices: list[str] | None = None
    label: int | None = None
    id: str = ""


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise UsageError(f"{path}: line {lineno} is not a JSON object")
                rows.append((lineno, row))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    return rows


def _to_example(path, lineno, row) -> Example:
    src = row.get("source")
    targets = row.get("targets")
    if targets is None and "target" in row:
        targets = [row["target"]]
    if not isinstance(src, str) or not src.strip():
        raise UsageError(f"{path}: line {lineno} has no non-empty string field 'source'")
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, str) and t.strip() for t in targets)):
        raise UsageError(f"{path}: line {lineno} needs 'target' (a string) or 'targets' (a list of strings)")
    return Example(source=src, target=row.get("target") or targets[0], targets=targets,
                   choices=row.get("choices"), label=row.get("label"), id=str(row.get("id", lineno)))


def _split_file(name: str, split: str) -> tuple[Path, slice]:
    sl = slice(None)
    if "[" in split:
        split, rng = split.rstrip("]").split("[")
        a, b = rng.split(":")
        sl = slice(int(a) if a else None, int(b) if b else None)
    return DATA_DIR / name / f"{split}.jsonl.gz", sl


def resolve_dataset(name: str) -> tuple[DatasetSpec, Path | None]:
    """A bundled dataset name, or a user JSONL file (summarization format) with source/target(s)."""
    if name in DATASETS:
        return DATASETS[name], None
    p = Path(name)
    if p.suffix in (".jsonl", ".gz", ".json") or "/" in name:
        if not p.is_file():
            raise UsageError(f"dataset file not found: {name}")
        return DatasetSpec(p.stem, "summarization", "file", "file", 64, "user data"), p
    raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} or give a .jsonl file")


def held_out(exs: list[Example], frac: float = 0.1, minimum: int = 1) -> tuple[list[Example], list[Example]]:
    """(rest, held-out part): a fixed ``frac`` of ``exs`` chosen by a hash of each item's text.

    Independent of ``--seed`` and of the file's order, so every run and ``eval`` of the same file agree on
    which items were never trained on."""
    def key(i):
        e = exs[i]
        return hashlib.sha256(f"{e.source}\x00{e.target}\x00{i}".encode()).hexdigest()
    order = sorted(range(len(exs)), key=key)
    held = set(order[: max(minimum, int(len(exs) * frac))])
    return [e for i, e in enumerate(exs) if i not in held], [e for i, e in enumerate(exs) if i in held]


def _user_splits(path: Path, eval_file: str | None) -> dict[str, list[Example]]:
    exs = [_to_example(path, ln, r) for ln, r in _read_jsonl(path)]
    if not exs:
        raise UsageError(f"dataset {str(path)!r} is empty")
    if eval_file is not None:
        ep = Path(eval_file)
        if not ep.is_file():
            raise UsageError(f"eval dataset file not found: {eval_file}")
        test = [_to_example(ep, ln, r) for ln, r in _read_jsonl(ep)]
        if not test:
            raise UsageError(f"eval dataset {eval_file!r} is empty")
        train = exs
    else:
        if len(exs) < 2:
            raise UsageError(f"{path}: {len(exs)} row(s) cannot be split into training and held-out evaluation "
                             f"data; add rows or give --eval-dataset FILE")
        train, test = held_out(exs)
    val: list[Example] = []
    if len(train) >= 10:
        train, val = held_out(train)
    check_no_overlap(train, test, str(path), eval_file or f"the held-out part of {path}")
    return {"train": train, "validation": val, "test": test}


def _norm(text: str) -> str:
    return " ".join(text.split())


def check_no_overlap(train: list[Example], test: list[Example], train_name: str, test_name: str) -> None:
    """Refuse to evaluate on items the model was trained on (same source text)."""
    seen = {_norm(e.source) for e in train}
    both = [e for e in test if _norm(e.source) in seen]
    if both:
        raise UsageError(f"{len(both)} of {len(test)} evaluation item(s) in {test_name} also appear in the "
                         f"training data {train_name} (e.g. id {both[0].id!r}); evaluation must use unseen data")


def load_examples(name: str, split: str = "train", limit: int | None = None, seed: int = 42,
                  eval_file: str | None = None) -> list[Example]:
    """Examples of a split, sub-sampled to ``limit`` with a fixed seed.

    ``split``: "train", "validation" (steers training: per-epoch loss, model choice) or "test" (final report;
    "eval" is an alias). Datasets without a validation split hold out a fixed 10% of train; a user's single
    JSONL holds out 10% as test and, from 10 remaining rows on, 10% of the rest as validation. ``eval_file``:
    a user's own test set for a user's training file (checked for overlap)."""
    split = "test" if split == "eval" else split
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    spec, path = resolve_dataset(name)
    if path is not None:
        exs = _user_splits(path, eval_file)[split]
    else:
        if eval_file is not None:
            raise UsageError("--eval-dataset is for your own JSONL training file; bundled datasets use their test split")
        test = _bundled(spec.name, spec.eval_split)
        if spec.val_split is not None:
            train, val = _bundled(spec.name, spec.train_split), _bundled(spec.name, spec.val_split)
        else:
            train, val = held_out(_bundled(spec.name, spec.train_split))
        if split == "validation":  # a few upstream items repeat across splits: validation keeps only unseen ones
            seen = {_norm(e.source) for e in train} | {_norm(e.source) for e in test}
            val = [e for e in val if _norm(e.source) not in seen]
        exs = {"train": train, "validation": val, "test": test}[split]
    if not exs and split != "validation":
        raise UsageError(f"dataset {name!r} ({split}) is empty")
    if limit is not None and limit < len(exs):
        rng = random.Random(seed)
        exs = [exs[i] for i in sorted(rng.sample(range(len(exs)), limit))]
    return exs


def _bundled(name: str, split: str) -> list[Example]:
    fname, sl = _split_file(name, split)
    return [_to_example(fname, ln, r) for ln, r in _read_jsonl(fname)[sl]]


# ---------------------------------------------------------------- prompt formats (GreenTrainer paper)

def format_example(ex: Example, task: str, eos: str, seq2seq: bool) -> tuple[str, str, str]:
    """(source text that may be truncated, fixed prompt suffix, target text incl. EOS where it belongs)."""
    if task == "qa":
        if seq2seq:
            return f"question: {ex.source}", "", ex.target
        return f"question: {ex.source}", f"{eos}answer: ", f"{ex.target}{eos}"
    if task == "piqa":
        sol1, sol2 = (ex.choices or ["", ""])[:2]
        prompt_tail = f"{eos}sol1: {sol1}{eos}sol2: {sol2}{eos}label: "
        if seq2seq:
            return f"goal: {ex.source}", prompt_tail.replace(eos, " ").rstrip(), str(ex.label)
        return f"goal: {ex.source}", prompt_tail, f"{ex.label}{eos}"
    if seq2seq:
        return f"summarize: {ex.source}", "", ex.target
    return ex.source, " TL;DR: ", f"{ex.target}{eos}"


@dataclasses.dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]          # -100 where the loss is off (prompt), for decoder-only; target ids for seq2seq
    prompt_ids: list[int]      # what generation starts from


def _token_parts(ex: Example, tok, task: str, seq2seq: bool) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the (truncatable) source, the fixed prompt suffix and the target."""
    src, suffix, tgt = format_example(ex, task, tok.eos_token, seq2seq)
    ids = lambda text: tok(text, add_special_tokens=False).input_ids if text else []  # noqa: E731
    return ids(src), ids(suffix), ids(tgt)


def encode_example(ex: Example, tok, task: str, seq2seq: bool, max_len: int, max_target_len: int = 256) -> Encoded:
    """Tokenise one example; truncate only the source so the input fits ``max_len``."""
    src_ids, suf_ids, tgt_ids = _token_parts(ex, tok, task, seq2seq)
    if seq2seq:
        eos = [tok.eos_token_id]
        room = max_len - len(suf_ids) - 1
        if room < 1:
            raise UsageError(f"--max-input-length {max_len} is too small to hold the prompt "
                             f"({len(suf_ids) + 2} tokens needed)")
        prompt = src_ids[:room] + suf_ids + eos
        labels = tgt_ids[: max_target_len - 1] + eos
        return Encoded(prompt, labels, prompt)
    bos = _bos(tok)
    room = max_len - len(bos) - len(suf_ids) - len(tgt_ids)
    if room < 1:
        raise UsageError(f"--max-input-length {max_len} is too small to hold the prompt and target of "
                         f"example {ex.id!r} ({len(bos) + len(suf_ids) + len(tgt_ids) + 1} tokens needed)")
    prompt = bos + src_ids[:room] + suf_ids
    return Encoded(prompt + tgt_ids, [-100] * len(prompt) + tgt_ids, prompt)


def encode_prompt(ex: Example, tok, task: str, seq2seq: bool, max_len: int) -> list[int]:
    """Prompt ids for generation, the source truncated so the prompt fits ``max_len``."""
    src_ids, suf_ids, _ = _token_parts(ex, tok, task, seq2seq)
    tail = suf_ids + ([tok.eos_token_id] if seq2seq else [])
    bos = _bos(tok) if not seq2seq else []
    return bos + src_ids[: max(1, max_len - len(tail) - len(bos))] + tail


def _bos(tok) -> list[int]:
    add = tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id and getattr(tok, "add_bos_token", False)
    return [tok.bos_token_id] if add else []


def encode_all(exs, tok, task, seq2seq, max_len) -> list[Encoded]:
    return [encode_example(e, tok, task, seq2seq, max_len) for e in exs]


def collate(batch: list[Encoded], pad_id: int, seq2seq: bool, pad_to_multiple: int = 8) -> dict:
    """Right-padded training batch; padded label positions are -100 so the loss ignores them."""
    def pad(seqs, value):
        n = max(len(s) for s in seqs)
        n = -(-n // pad_to_multiple) * pad_to_multiple
        return torch.tensor([s + [value] * (n - len(s)) for s in seqs]), [len(s) for s in seqs]

    ids, lens = pad([b.input_ids for b in batch], pad_id)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    labels, _ = pad([b.labels for b in batch], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
