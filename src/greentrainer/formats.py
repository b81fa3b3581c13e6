"""Users' data in the formats people use, read through the ``datasets`` library.

Formats (``--dataset-format``, detected from the columns by default):

* ``messages``: conversations, ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``;
  the tokenizer's chat template renders them and the loss covers every assistant turn, nothing else.
* ``prompt-completion`` (TRL's): ``prompt`` and ``completion``, both strings (used as they are, the loss on the
  completion) or both message lists (the template renders them, the loss on the completion's turns).
* ``alpaca``: ``instruction``, optional ``input``, ``output``: one user turn and one assistant turn.
* ``text``: causal language modelling, the loss on every token.
* ``source-target``: ``source`` and ``target`` (or ``targets``, a list of references): the instruction and the
  source as the user turn, the target as the assistant turn (the bundled datasets' format).

File types: JSONL (read line by line, so a bad row is named by its line), JSON (an array or JSON lines), CSV,
Parquet, a ``Dataset.save_to_disk`` folder, or a Hugging Face Hub dataset name when online. A bad row stops
the run before anything is written, in one line naming the row.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
from pathlib import Path

from .errors import UsageError

FORMATS = ("messages", "prompt-completion", "alpaca", "text", "source-target")
ROLES = ("system", "user", "assistant", "tool")
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".gz": "json"}
ACCEPTED = ("messages (a list of {role, content}); prompt and completion; instruction, input and output (alpaca); "
            "text; source and target(s)")


@dataclasses.dataclass
class Example:
    source: str
    target: str
    targets: list[str]
    choices: list[str] | None = None
    label: int | None = None
    id: str = ""
    # users' formats (greentrainer.formats): a conversation and which of its messages carry the loss; plain
    # text (the loss on every token); a prompt/completion pair used as it is (no instruction, no template)
    messages: list[dict] | None = None
    trained: list[bool] | None = None
    text: str | None = None
    raw: bool = False


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


def is_user_data(name: str) -> bool:
    """Whether ``name`` is a file, a folder or a hub dataset name rather than a bundled dataset."""
    p = Path(name)
    return p.exists() or p.suffix in FILE_TYPES or "/" in name


@functools.lru_cache(maxsize=8)
def _read(name: str, stamp: float) -> tuple[tuple[int, dict], ...]:
    return tuple(read_rows(name))


def rows_of(name: str) -> list[tuple[int, dict]]:
    """(row number, row) of a file, folder or hub dataset (cached while the file is unchanged)."""
    p = Path(name)
    return list(_read(name, p.stat().st_mtime if p.exists() else 0.0))


def read_rows(name: str) -> list[tuple[int, dict]]:
    """Every row with its number (1-based: a JSONL's line number, else its place in the table)."""
    p = Path(name)
    if p.suffix in (".jsonl", ".gz") and p.is_file():
        return _read_jsonl(p)
    try:
        import datasets
    except ImportError:
        raise UsageError(f"reading {name} needs the datasets library: pip install datasets") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if p.is_dir():
            table = datasets.load_from_disk(str(p))
            if isinstance(table, datasets.DatasetDict):
                if "train" not in table:
                    raise UsageError(f"{name}: a DatasetDict without a 'train' split (it has {', '.join(table)}); "
                                     f"give one split's folder")
                table = table["train"]
        elif p.is_file():
            if p.suffix not in FILE_TYPES:
                raise UsageError(f"{name}: unknown file type {p.suffix!r}; give .jsonl, .json, .csv, .parquet or a "
                                 f"save_to_disk folder")
            kwargs = _csv_as_text(p, datasets) if p.suffix == ".csv" else {}
            table = datasets.load_dataset(FILE_TYPES[p.suffix], data_files=str(p), split="train", **kwargs)
        elif p.suffix in FILE_TYPES:
            raise UsageError(f"dataset file not found: {name}")
        else:
            table = datasets.load_dataset(name, split="train")
    except UsageError:
        raise
    except FileNotFoundError as e:
        raise UsageError(f"dataset not found: {name} ({e})") from None
    except (ConnectionError, OSError) as e:
        if not p.exists():
            raise UsageError(f"cannot load {name!r} from the Hugging Face Hub (offline, or no such dataset: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); give a local file") from None
        raise UsageError(f"cannot read {name}: {e}") from None
    except Exception as e:  # a table pyarrow cannot read (mixed types in a column, bad CSV, …): its first cause
        while (e.__cause__ or e.__context__) is not None and "generating the dataset" in str(e):
            e = e.__cause__ or e.__context__
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot read {name}: {first[:300]}") from None
    return [(i, dict(row)) for i, row in enumerate(table, 1)]


def _csv_as_text(path: Path, datasets) -> dict:
    """Every CSV cell as the text it holds (an output "1" stays "1", an empty input stays "")."""
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return {"features": datasets.Features({c: datasets.Value("string") for c in header}), "keep_default_na": False}


def detect_format(rows: list[tuple[int, dict]], name: str, requested: str = "auto") -> str:
    """The format named by ``requested``, or the one the columns show; one line naming what was found if none."""
    if requested not in ("auto", *FORMATS):
        raise UsageError(f"--dataset-format must be auto or one of {', '.join(FORMATS)}, got {requested!r}")
    columns = sorted({k for _, r in rows[:100] for k in r})
    found = ("messages" if "messages" in columns else
             "prompt-completion" if {"prompt", "completion"} <= set(columns) else
             "alpaca" if {"instruction", "output"} <= set(columns) else
             "source-target" if "source" in columns and ({"target", "targets"} & set(columns)) else
             "text" if "text" in columns else None)
    if requested != "auto":
        return requested
    if found is None:
        raise UsageError(f"{name}: cannot tell the data format from its columns ({', '.join(columns) or 'none'}); "
                         f"accepted: {ACCEPTED}")
    return found


def _where(name, n) -> str:
    return f"{name}: row {n}"


def _message_list(value, name, n, field) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UsageError(f"{_where(name, n)}: '{field}' must be a non-empty list of {{role, content}} messages")
    out = []
    for k, m in enumerate(value, 1):
        if not isinstance(m, dict) or "role" not in m or m["role"] is None:
            raise UsageError(f"{_where(name, n)}: message {k} of '{field}' has no role")
        if m["role"] not in ROLES:
            raise UsageError(f"{_where(name, n)}: message {k} of '{field}' has role {m['role']!r}; "
                             f"expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UsageError(f"{_where(name, n)}: message {k} of '{field}' ({m['role']}) has no string content")
        if m["role"] == "assistant" and not m["content"].strip():
            raise UsageError(f"{_where(name, n)}: message {k} of '{field}' is an empty assistant turn")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _string(row, key, name, n, required=True) -> str:
    v = row.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v.strip()):
        raise UsageError(f"{_where(name, n)}: '{key}' must be a non-empty string")
    return v


def to_example(row: dict, fmt: str, name: str, n: int):
    """One row as an :class:`~greentrainer.data.Example` (the reference for evaluation: the last trained turn)."""
    if fmt == "source-target":
        return _to_example(name, n, row)
    if fmt == "text":
        text = _string(row, "text", name, n)
        return Example(source=text, target="", targets=[""], id=str(row.get("id", n)), text=text)
    if fmt == "alpaca":
        instruction, extra = _string(row, "instruction", name, n), _string(row, "input", name, n, required=False)
        output = _string(row, "output", name, n)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Example(source=user, target=output, targets=[output], id=str(row.get("id", n)), messages=messages,
                       trained=[False, True])
    if fmt == "prompt-completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) or isinstance(completion, str):
            prompt, completion = _string(row, "prompt", name, n), _string(row, "completion", name, n)
            return Example(source=prompt, target=completion, targets=[completion], id=str(row.get("id", n)),
                           raw=True)
        head = _message_list(prompt, name, n, "prompt")
        tail = _message_list(completion, name, n, "completion")
        if not any(m["role"] == "assistant" for m in tail):
            raise UsageError(f"{_where(name, n)}: 'completion' has no assistant turn to train on")
        messages = head + tail
        trained = [False] * len(head) + [m["role"] == "assistant" for m in tail]
        return _conversation(messages, trained, row, n)
    if fmt == "messages":
        messages = _message_list(row.get("messages"), name, n, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise UsageError(f"{_where(name, n)}: the conversation has no assistant turn to train on")
        return _conversation(messages, [m["role"] == "assistant" for m in messages], row, n)
    raise UsageError(f"unknown data format {fmt!r}")


def _conversation(messages, trained, row, n):
    last = max(i for i, t in enumerate(trained) if t)
    user = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
    return Example(source=user or messages[0]["content"], target=messages[last]["content"],
                   targets=[messages[last]["content"]], id=str(row.get("id", n)), messages=messages, trained=trained)


def load_user_examples(name: str, requested: str = "auto"):
    """(format, examples) of a user's file, folder or hub dataset."""
    rows = rows_of(name)
    if not rows:
        raise UsageError(f"dataset {name!r} is empty")
    fmt = detect_format(rows, name, requested)
    return fmt, [to_example(r, fmt, name, n) for n, r in rows]
