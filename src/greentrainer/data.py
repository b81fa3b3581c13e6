"""Datasets, the GreenTrainer paper's prompt formats, truncation and collation with label masking.

Bundled datasets live in ``greentrainer/datasets/<name>/<split>.jsonl.gz`` (licences in its README).
Every record has ``source``, ``target`` and ``targets`` (all references); PIQA adds ``choices``/``label``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import torch

from .errors import UsageError
from .formats import Example, _read_jsonl, _to_example  # noqa: F401  (rows -> examples; Example re-exported)

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
    instruction: str = ""         # what the chat format asks for before the source (see PromptFormat)


DATASETS = {
    "scitldr": DatasetSpec("scitldr", "summarization", "train", "test", 64, "Apache-2.0", val_split="validation",
                           instruction="Write a one-sentence TL;DR of this scientific paper."),
    "dialogsum": DatasetSpec("dialogsum", "summarization", "train", "test", 128, "CC BY-NC-SA 4.0 (non-commercial)",
                             val_split="validation", instruction="Summarize this dialogue in a few sentences."),
    "samsum": DatasetSpec("samsum", "summarization", "validation", "test", 128, "CC BY-NC-ND 4.0 (non-commercial)",
                          "no train split is bundled: trains on validation (less a held-out 10%), evaluates on test",
                          instruction="Summarize this dialogue."),
    "webquestions": DatasetSpec("webquestions", "qa", "train", "test", 32, "CC-BY 4.0",
                                "validation: a fixed 10% held out of train",
                                instruction="Answer this question with a name or a short phrase."),
    "piqa": DatasetSpec("piqa", "piqa", "validation[:-500]", "validation[-500:]", 8, "AFL-3.0",
                        "only the labelled validation split exists: its first 1338 items train (less a held-out "
                        "10% for validation), the last 500 evaluate",
                        instruction="Which solution reaches the goal? Answer 0 or 1."),
}
SPLITS = ("train", "validation", "test")
GROUP_SPAN = 50  # --group-by-length sorts runs of this many global batches by length (transformers' choice)

def _split_file(name: str, split: str) -> tuple[Path, slice]:
    sl = slice(None)
    if "[" in split:
        split, rng = split.rstrip("]").split("[")
        a, b = rng.split(":")
        sl = slice(int(a) if a else None, int(b) if b else None)
    return DATA_DIR / name / f"{split}.jsonl.gz", sl


def resolve_dataset(name: str, data_format: str = "auto") -> tuple[DatasetSpec, Path | None]:
    """A bundled dataset name, or a user's file, folder or hub dataset in one of :mod:`greentrainer.formats`'
    formats (task ``summarization``: ROUGE against the last trained turn; ``lm`` for plain text: loss only)."""
    if name in DATASETS:
        return DATASETS[name], None
    from .formats import detect_format, is_user_data, rows_of
    if is_user_data(name):
        rows = rows_of(name)
        if not rows:
            raise UsageError(f"dataset {name!r} is empty")
        task = "lm" if detect_format(rows, name, data_format) == "text" else "summarization"
        return DatasetSpec(Path(name).stem or name, task, "file", "file", 64, "user data"), Path(name)
    raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} or give a file (.jsonl, .json, "
                     f".csv, .parquet), a save_to_disk folder or a hub dataset name")


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


def _user_splits(path: Path, eval_file: str | None, data_format: str = "auto") -> dict[str, list[Example]]:
    from .formats import is_user_data, load_user_examples
    _, exs = load_user_examples(str(path), data_format)
    if eval_file is not None:
        if not is_user_data(eval_file) or (not Path(eval_file).exists() and Path(eval_file).suffix):
            raise UsageError(f"eval dataset file not found: {eval_file}")
        _, test = load_user_examples(eval_file, data_format)
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


def _norm(text) -> str:
    return " ".join(text.split())


def _key(e: Example) -> str:
    """What makes two items the same for the overlap check: the source, or a whole conversation or text."""
    if e.messages is not None:
        return _norm(" ".join(m["content"] for m in e.messages[: max(i for i, t in enumerate(e.trained) if t)]))
    return _norm(e.text if e.text is not None else e.source)


def check_no_overlap(train: list[Example], test: list[Example], train_name: str, test_name: str) -> None:
    """Refuse to evaluate on items the model was trained on (same source text)."""
    seen = {_key(e) for e in train}
    both = [e for e in test if _key(e) in seen]
    if both:
        raise UsageError(f"{len(both)} of {len(test)} evaluation item(s) in {test_name} also appear in the "
                         f"training data {train_name} (e.g. id {both[0].id!r}); evaluation must use unseen data")


def load_examples(name: str, split: str = "train", limit: int | None = None, seed: int = 42,
                  eval_file: str | None = None, data_format: str = "auto") -> list[Example]:
    """Examples of a split, sub-sampled to ``limit`` with a fixed seed.

    ``split``: "train", "validation" (steers training: per-epoch loss, model choice) or "test" (final report;
    "eval" is an alias). Datasets without a validation split hold out a fixed 10% of train; a user's single
    JSONL holds out 10% as test and, from 10 remaining rows on, 10% of the rest as validation. ``eval_file``:
    a user's own test set for a user's training file (checked for overlap)."""
    split = "test" if split == "eval" else split
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    spec, path = resolve_dataset(name, data_format)
    if path is not None:
        exs = _user_splits(path, eval_file, data_format)[split]
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


# ---------------------------------------------------------------- prompt formats

PROMPT_FORMATS = ("auto", "chat", "plain")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How an example becomes tokens. ``plain``: the GreenTrainer paper's text formats ("<source> TL;DR:
    <target>"). ``chat``: the tokenizer's chat template, with the instruction and the source as the user turn
    and the target as the assistant turn (the loss covers the assistant's tokens and its end-of-turn only).
    Training, zero-shot and fine-tuned evaluation use the same format; a run records it (``to_dict``)."""

    kind: str = "plain"
    instruction: str = ""

    def to_dict(self) -> dict:
        return {"prompt_format": self.kind, "instruction": self.instruction}


PLAIN = PromptFormat()


def resolve_prompt_format(requested: str, tok, seq2seq: bool, instruction: str = "") -> PromptFormat:
    """``auto``: the chat format where the tokenizer has a chat template (decoder-only models), else plain."""
    has_template = bool(getattr(tok, "chat_template", None)) and not seq2seq
    if requested == "chat" and not has_template:
        raise UsageError("--prompt-format chat: " + ("encoder-decoder models use the plain format" if seq2seq else
                                                      "this tokenizer has no chat template") + "; use plain or auto")
    if requested not in PROMPT_FORMATS:
        raise UsageError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {requested!r}")
    chat = requested == "chat" or (requested == "auto" and has_template)
    return PromptFormat("chat", instruction) if chat else PLAIN


PROMPT_FILE = "greentrainer_prompt.json"  # in a saved model folder: the format it was trained with


def recorded_prompt_format(path: str) -> PromptFormat | None:
    """The prompt format a run folder's (or saved model folder's) model was trained with, if recorded."""
    p = Path(path)
    for f in (p / PROMPT_FILE, p / "model" / PROMPT_FILE):
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
                return PromptFormat(str(d["prompt_format"]), str(d.get("instruction") or ""))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise UsageError(f"{f} is unreadable; delete it to use --prompt-format") from None
    return None


def format_example(ex: Example, task: str, eos: str, seq2seq: bool) -> tuple[str, str, str]:
    """The paper's plain format: (source text that may be truncated, fixed prompt suffix, target text incl.
    EOS where it belongs)."""
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


_SRC, _TGT = "\x00source\x00", "\x00target\x00"  # placeholders the template cannot produce itself


def chat_example(ex: Example, task: str, tok, instruction: str) -> tuple[str, str, str, str]:
    """The chat format: (template text before the source, the source, the text after it through the assistant
    header, the target with the end of the assistant turn). The template is rendered once for generation
    and once with the answer; a template that renders the prompt differently in the two is refused."""
    user = f"{instruction}\n\n{_SRC}" if instruction else _SRC
    target = ex.target
    if task == "piqa":
        sol1, sol2 = (ex.choices or ["", ""])[:2]
        user += f"\n0: {sol1}\n1: {sol2}"
        target = str(ex.label)
    turn = [{"role": "user", "content": user}]
    prompt = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(turn + [{"role": "assistant", "content": _TGT}], tokenize=False)
    if not full.startswith(prompt) or prompt.count(_SRC) != 1 or full[len(prompt):].count(_TGT) != 1:
        raise UsageError("this tokenizer's chat template renders the prompt differently for training and for "
                         "generation; use --prompt-format plain")
    before, after = prompt.split(_SRC)
    t_before, t_after = full[len(prompt):].split(_TGT)
    return before, ex.source, after, t_before + target + t_after.rstrip()


@dataclasses.dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]          # -100 where the loss is off (prompt), for decoder-only; target ids for seq2seq
    prompt_ids: list[int]      # what generation starts from
    truncated: bool = False    # cut to --max-input-length (its source, prompt or the conversation's end)
    position_ids: list[int] | None = None  # a packed row (--packing): each example's positions from 0
    parts: tuple = ()          # a packed row: the examples in it, in order


def pack(data: list[Encoded], capacity: int) -> list[Encoded]:
    """Examples packed into rows of at most ``capacity`` tokens by best-fit decreasing (each example into the
    fullest row it still fits, longest first; the same rows on every process and at every resume). A row's
    positions restart at 0 for each example and the first label of each example is off (-100), so no example
    is predicted from another's last token; the model keeps their attention apart (``keeps_packed_apart``)."""
    import bisect
    order = sorted(range(len(data)), key=lambda i: (-len(data[i].input_ids), i))
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the fullest row that fits is the first ≥ n
    rows: list[list[int]] = []
    for i in order:
        n = len(data[i].input_ids)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    out = []
    for members in rows:
        parts = tuple(data[i] for i in sorted(members))
        out.append(Encoded(input_ids=[t for e in parts for t in e.input_ids],
                           labels=[t for e in parts for t in [-100] + e.labels[1:]], prompt_ids=[],
                           position_ids=[j for e in parts for j in range(len(e.input_ids))], parts=parts))
    return out


def keeps_packed_apart(model) -> bool:
    """Whether this model keeps packed examples apart: two short random examples in one row (per-example
    positions, no attention mask) give the second the same logits as alone. transformers' mask builders do this
    for most decoder models; some (learned positions from the mask, ALiBi: OPT, BLOOM) do not."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    a, b = (torch.randint(0, vocab, (1, n), generator=g).to(device) for n in (5, 7))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            row = model(input_ids=torch.cat([a, b], 1), position_ids=torch.cat([torch.arange(5), torch.arange(7)])
                        [None].to(device), use_cache=False).logits[0, 5:].float()
            alone = model(input_ids=b, use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    return bool(torch.allclose(row, alone, atol=1e-3 * max(1.0, float(alone.abs().max())), rtol=1e-3))


def _token_parts(ex: Example, tok, task: str, seq2seq: bool, fmt: PromptFormat = PLAIN):
    """Token ids of the fixed prompt head, the (truncatable) source, the fixed prompt tail and the target."""
    ids = lambda text: tok(text, add_special_tokens=False).input_ids if text else []  # noqa: E731
    if fmt.kind == "chat":
        head, src, tail, tgt = chat_example(ex, task, tok, fmt.instruction)
        return ids(head), ids(src), ids(tail), ids(tgt)
    src, suffix, tgt = format_example(ex, task, tok.eos_token, seq2seq)
    return (_bos(tok) if not seq2seq else []), ids(src), ids(suffix), ids(tgt)


def encode_example(ex: Example, tok, task: str, seq2seq: bool, max_len: int, max_target_len: int = 256,
                   fmt: PromptFormat = PLAIN) -> Encoded:
    """Tokenise one example; truncate only the source so the input fits ``max_len`` (a conversation or a text:
    its end; a prompt/completion pair: the prompt's beginning)."""
    if ex.messages is not None or ex.text is not None or ex.raw:
        return _encode_user(ex, tok, seq2seq, max_len, fmt)
    head, src_ids, suf_ids, tgt_ids = _token_parts(ex, tok, task, seq2seq, fmt)
    if seq2seq:
        eos = [tok.eos_token_id]
        room = max_len - len(suf_ids) - 1
        if room < 1:
            raise UsageError(f"--max-input-length {max_len} is too small to hold the prompt "
                             f"({len(suf_ids) + 2} tokens needed)")
        prompt = src_ids[:room] + suf_ids + eos
        labels = tgt_ids[: max_target_len - 1] + eos
        return Encoded(prompt, labels, prompt, len(src_ids) > room)
    room = max_len - len(head) - len(suf_ids) - len(tgt_ids)
    if room < 1:
        raise UsageError(f"--max-input-length {max_len} is too small to hold the prompt and target of "
                         f"example {ex.id!r} ({len(head) + len(suf_ids) + len(tgt_ids) + 1} tokens needed)")
    prompt = head + src_ids[:room] + suf_ids
    return Encoded(prompt + tgt_ids, [-100] * len(prompt) + tgt_ids, prompt, len(src_ids) > room)


def render_plain(messages: list[dict], add_generation_prompt: bool = False, eos: str = "") -> str:
    """A conversation for a tokenizer without a chat template: "### Role:" blocks, each assistant turn ended by
    EOS (the format of Alpaca-style instruction tuning)."""
    out = "".join(f"### {m['role'].capitalize()}:\n{m['content']}" + (eos if m["role"] == "assistant" else "")
                  + "\n\n" for m in messages)
    return out + ("### Assistant:\n" if add_generation_prompt else "")


def conversation_segments(ex: Example, tok, fmt: PromptFormat = PLAIN):
    """A conversation as (text, carries the loss) pieces in order: the template's text up to each trained
    assistant turn (its generation prompt included), then that turn's content through its end-of-turn."""
    def render(msgs, gen=False):
        if fmt.kind == "chat":
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return render_plain(msgs, gen, tok.eos_token or "")
    msgs, out, done = ex.messages, [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or not ex.trained[i]:
            continue
        prompt, full = render(msgs[:i], True), render(msgs[: i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UsageError("this tokenizer's chat template does not render a conversation as a growing prefix "
                             "(turn by turn); use --prompt-format plain")
        turn = full[len(prompt):].rstrip()  # whitespace after the end of turn belongs to the next prompt
        out += [(prompt[len(done):], False), (turn, True)]
        done = prompt + turn
    return out


def _conversation_tokens(ex: Example, tok, fmt: PromptFormat) -> tuple[list[int], list[int], int]:
    """(tokens, labels, where the last trained turn's content starts) of a whole conversation, the loss on its
    trained turns; the tokens before that start are what generation starts from."""
    toks = _bos(tok) if fmt.kind != "chat" else []
    labels, start = [-100] * len(toks), 0
    for text, trains in conversation_segments(ex, tok, fmt):
        t = tok(text, add_special_tokens=False).input_ids if text else []
        if trains:
            start = len(toks)
        toks += t
        labels += t if trains else [-100] * len(t)
    return toks, labels, start


def _encode_user(ex: Example, tok, seq2seq: bool, max_len: int, fmt: PromptFormat) -> Encoded:
    """A conversation (loss on its trained turns), a plain text (loss on every token) or a prompt/completion
    pair (loss on the completion), cut at ``max_len``; refused when nothing to train on would remain."""
    if seq2seq:
        raise UsageError("conversations, plain text and prompt/completion data train decoder-only models; this "
                         "model is an encoder-decoder (use source/target data)")
    ids = lambda text: tok(text, add_special_tokens=False).input_ids if text else []  # noqa: E731
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if ex.text is not None:
        toks = _bos(tok) + ids(ex.text) + eos
        kept = toks[:max_len]
        return Encoded(kept, list(kept), kept[:1], len(toks) > max_len)
    if ex.raw:
        prompt, target = _bos(tok) + ids(ex.source), ids(ex.target) + eos
        room = max_len - len(target)
        if room < 1:
            raise UsageError(f"row {ex.id}: the completion alone ({len(target)} tokens) does not fit "
                             f"--max-input-length {max_len}; raise it or shorten the completion")
        cut = prompt[-room:]  # the prompt's end, next to the completion, stays
        return Encoded(cut + target, [-100] * len(cut) + target, cut, len(prompt) > room)
    toks, labels, start = _conversation_tokens(ex, tok, fmt)
    if all(x == -100 for x in labels[:max_len]):
        raise UsageError(f"row {ex.id}: the conversation is longer than --max-input-length {max_len} "
                         f"({len(toks)} tokens) and its first assistant turn would be cut entirely; raise "
                         f"--max-input-length or shorten the conversation")
    return Encoded(toks[:max_len], labels[:max_len], toks[:start][-max_len:], len(toks) > max_len)


def prompt_ids(ex: Example, tok, fmt: PromptFormat, max_len: int) -> list[int]:
    """What generation starts from for a conversation: every turn before the last trained one and its
    generation prompt, the most recent ``max_len`` tokens."""
    toks, _, start = _conversation_tokens(ex, tok, fmt)
    return toks[:start][-max_len:]


def encode_prompt(ex: Example, tok, task: str, seq2seq: bool, max_len: int, fmt: PromptFormat = PLAIN) -> list[int]:
    """Prompt ids for generation, the source truncated so the prompt fits ``max_len``."""
    if ex.messages is not None:
        return prompt_ids(ex, tok, fmt, max_len)
    if ex.raw:
        return (_bos(tok) + tok(ex.source, add_special_tokens=False).input_ids)[-max_len:]
    head, src_ids, suf_ids, _ = _token_parts(ex, tok, task, seq2seq, fmt)
    tail = suf_ids + ([tok.eos_token_id] if seq2seq else [])
    return head + src_ids[: max(1, max_len - len(tail) - len(head))] + tail


def stop_token_ids(tok, fmt: PromptFormat = PLAIN) -> list[int]:
    """Token ids that end generation: EOS, and in the chat format the template's end-of-turn token."""
    stops = [tok.eos_token_id]
    if fmt.kind == "chat":
        end = chat_example(Example("x", "", [""]), "summarization", tok, "")[3]
        first = tok(end, add_special_tokens=False).input_ids[:1]
        if first and first[0] in tok.all_special_ids and first[0] not in stops:
            stops += first
    return stops


def _bos(tok) -> list[int]:
    add = tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id and getattr(tok, "add_bos_token", False)
    return [tok.bos_token_id] if add else []


def encode_all(exs, tok, task, seq2seq, max_len, fmt: PromptFormat = PLAIN) -> list[Encoded]:
    return [encode_example(e, tok, task, seq2seq, max_len, fmt=fmt) for e in exs]


def collate(batch: list[Encoded], pad_id: int, seq2seq: bool, pad_to_multiple: int = 8) -> dict:
    """Right-padded training batch; padded label positions are -100 so the loss ignores them. Packed rows
    (--packing) carry position ids instead of an attention mask (transformers then keeps their examples apart;
    the padding is a segment of its own) and ``use_cache=False`` (a cache turns that off)."""
    def pad(seqs, value):
        n = max(len(s) for s in seqs)
        n = -(-n // pad_to_multiple) * pad_to_multiple
        return torch.tensor([s + [value] * (n - len(s)) for s in seqs]), [len(s) for s in seqs]

    ids, lens = pad([b.input_ids for b in batch], pad_id)
    labels, _ = pad([b.labels for b in batch], -100)
    if any(b.position_ids is not None for b in batch):
        n = ids.shape[1]
        pos = [(b.position_ids or list(range(len(b.input_ids)))) + list(range(n - k)) for b, k in zip(batch, lens)]
        return {"input_ids": ids, "position_ids": torch.tensor(pos), "labels": labels, "use_cache": False}
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def typical_shape(data, batch_size: int, seq2seq: bool) -> tuple[int, int, int | None]:
    """Batch shape used for the FLOPs profile: the 90th-percentile padded lengths of the training data."""
    lens = sorted(len(e.input_ids) for e in data)
    seq = -(-lens[int(0.9 * (len(lens) - 1))] // 8) * 8
    tgt = None
    if seq2seq:
        tl = sorted(len(e.labels) for e in data)
        tgt = -(-tl[int(0.9 * (len(tl) - 1))] // 8) * 8
    return batch_size, seq, tgt


def group_by_length(perm: list[int], lengths, g: int, generator) -> list[int]:
    """``perm`` cut into runs of ``GROUP_SPAN`` global batches of ``g`` items, each run sorted by length into
    global batches whose order is then shuffled (so no run trains its long items first: the measured step size,
    which the FLOPs budget plans with, is the epoch's average from the first steps on). A short last batch stays
    last."""
    out, span = [], g * GROUP_SPAN
    for t in range(0, len(perm), span):
        run = sorted(perm[t: t + span], key=lambda i: -lengths[i])
        batches = [run[k: k + g] for k in range(0, len(run), g)]
        full = [b for b in batches if len(b) == g]
        order = torch.randperm(len(full), generator=generator).tolist()
        out += [i for k in order for i in full[k]] + [i for b in batches if len(b) < g for i in b]
    return out


def mean_padded_size(data, batch_size: int, seq2seq: bool, rounds: int = 20, seed: int = 0,
                     grouped: bool = False) -> float:
    """Expected padded length per batch (input + target for seq2seq) over random shuffles of the data, a
    short last batch counted by its share of a full one (its FLOPs are that much smaller); ``grouped``: batched
    as --group-by-length batches them."""
    rng = random.Random(seed)
    idx, sizes = list(range(len(data))), []
    size_of = [len(e.input_ids) + (len(e.labels) if seq2seq else 0) for e in data]
    order = torch.Generator().manual_seed(seed)  # the order of grouped batches: no effect on the mean
    for _ in range(rounds):
        rng.shuffle(idx)
        if grouped:
            idx = group_by_length(idx, size_of, batch_size, order)
        for i in range(0, len(idx), batch_size):
            items = [data[j] for j in idx[i: i + batch_size]]
            size = max(len(e.input_ids) for e in items)
            if seq2seq:
                size += max(len(e.labels) for e in items)
            sizes.append(size * len(items) / batch_size)
    return sum(sizes) / max(len(sizes), 1)


def target_tokens(batch: dict, seq2seq: bool) -> int:
    """Tokens the loss averages over (a causal LM predicts each label from the previous position)."""
    labels = batch["labels"] if seq2seq else batch["labels"][:, 1:]
    return int((labels != -100).sum())
