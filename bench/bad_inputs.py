"""Every bad input and fault we know of, tried against `greentrainer train|eval|profile` and the Trainer
callback: each must end in one line on stderr and an exit code (2 bad input, 1 fault, 130/143 interrupted),
never a traceback, never touching what is not ours, never a broken run marked complete.

    python bench/bad_inputs.py            # writes bench/results/bad_inputs.{md,json}
    python bench/bad_inputs.py --quick    # a dozen cases (smoke test)

Runs on a tiny random model built in code (no downloads); the faults (NaN loss, disk full via a file-size
limit, SIGTERM, SIGINT) run in subprocesses.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

ROWS = [{"source": f"the cat number {i} sat on the mat and looked at the dog", "target": f"cat {i} sat"}
        for i in range(20)]


class Env:
    """A scratch folder with a tiny model, data files and a user's own files that must survive."""

    def __init__(self, root: Path):
        import torch
        from transformers import AutoModelForCausalLM
        from greentrainer.models import tiny_config, tiny_tokenizer
        self.root = root
        self.model = root / "tiny"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").save_pretrained(self.model)
        tiny_tokenizer().save_pretrained(self.model)
        self.data = self.write("data.jsonl", [json.dumps(r) for r in ROWS])
        self.user = root / "user_project"
        (self.user / ".git").mkdir(parents=True)
        (self.user / "notes.txt").write_text("the user's own file")
        self._n = 0

    def write(self, name: str, lines, binary: bool = False) -> str:
        p = self.root / name
        if binary:
            p.write_bytes(lines)
        else:
            p.write_text("".join(line + "\n" for line in lines))
        return str(p)

    def out(self) -> Path:
        self._n += 1
        return self.root / f"out{self._n}"

    def model_copy(self, name: str, edit) -> str:
        d = self.root / name
        if not d.exists():
            shutil.copytree(self.model, d)
            edit(d)
        return str(d)

    def arch_model(self, arch: str) -> str:
        """A tiny random model of another architecture, with the same tokenizer."""
        import torch
        from transformers import AutoModelForCausalLM
        from greentrainer.models import tiny_config, tiny_tokenizer
        d = self.root / f"tiny_{arch}"
        if not d.exists():
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(tiny_config(arch)).save_pretrained(d)
            tiny_tokenizer().save_pretrained(d)
        return str(d)

    def train(self, *extra, out=None, data=None) -> list[str]:
        out = out or self.out()
        return ["train", "--model", str(self.model), "--dataset", data or self.data, "--output-dir", str(out),
                "--epochs", "1", "--no-progress", "--num-beams", "1", "--max-new-tokens", "4", "--method", "full",
                *extra]

    def run_folder(self, status: str | None = None) -> str:
        out = self.root / f"run_{status or 'complete'}"
        if not out.exists():
            _in_process(self.train("--no-eval", out=out))
            if status:
                m = json.loads((out / "metrics.json").read_text())
                m["status"], m["reason"] = status, "set by bad_inputs.py"
                (out / "metrics.json").write_text(json.dumps(m))
        return str(out)


def _in_process(argv) -> tuple[int, str, str]:
    from greentrainer.cli import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse --help and the like
            rc = e.code
        except BaseException as e:  # noqa: BLE001  (what we are testing for: it must never get here)
            import traceback
            traceback.print_exc(file=err)
            rc = f"escaped {type(e).__name__}"
    return rc, out.getvalue(), err.getvalue()


def _subprocess(argv, signal_after_epoch=None, fsize=None, cwd=None) -> tuple[int, str, str]:
    def limits():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    cmd = [sys.executable, "-m", "greentrainer.cli", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limits,
                            cwd=cwd)
    if signal_after_epoch is not None:
        out = Path(argv[argv.index("--output-dir") + 1])
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads((out / "metrics.json").read_text()).get("history"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        proc.send_signal(signal_after_epoch)
    so, se = proc.communicate(timeout=300)
    return proc.returncode, so, se


def cases(env: Env) -> list[dict]:
    """(area, what, argv, expected exit code, kind): kind usage = nothing written; fault = run marked failed."""
    e, C = env, []

    def add(area, what, argv, code=2, kind="usage", needle=None, runner="in", **kw):
        C.append(dict(area=area, what=what, argv=argv, code=code, kind=kind, needle=needle, runner=runner, kw=kw))

    bad_json = e.write("bad.jsonl", ['{"source": "a", "target": "b"}', "{broken"])
    not_obj = e.write("list.jsonl", ["[1, 2]"])
    no_src = e.write("nosrc.jsonl", ['{"src": "x", "target": "y"}'])
    empty_tgt = e.write("emptytgt.jsonl", ['{"source": "x", "target": ""}'])
    bad_tgts = e.write("badtgts.jsonl", ['{"source": "x", "targets": [1, 2]}'])
    empty = e.write("empty.jsonl", [])
    latin1 = e.write("latin1.jsonl", '{"source": "caf\xe9", "target": "x"}\n'.encode("latin-1"), binary=True)
    gz = e.write("corrupt.jsonl.gz", b"not gzip at all", binary=True)
    one_row = e.write("one.jsonl", [json.dumps(ROWS[0])])
    overlap = e.write("overlap.jsonl", [json.dumps(r) for r in ROWS[:3]])
    fresh = e.write("fresh.jsonl", [json.dumps({"source": "an unseen text", "target": "new"})])
    sched_missing = str(e.root / "no_schedule.txt")
    sched_latin = e.write("sched_latin.txt", b"0 0.6\n\xff\xfe 0.5\n", binary=True)
    sched_bad = e.write("sched_bad.txt", ["0 zero"])
    sched_big = e.write("sched_big.txt", ["0 1.5"])
    sched_nan = e.write("sched_nan.txt", ["0 nan"])
    a_file = e.write("a_file.txt", ["x"])

    # -- the model
    add("model", "model folder does not exist", e.train("--model", "./no/such/model"), needle="not found")
    add("model", "hub name while offline", e.train("--model", "nobody-xyz/nomodel-abc"), needle="Hub")
    add("model", "--model is a file", e.train("--model", a_file), needle="a file")
    add("model", "folder without config.json", e.train("--model", str(e.user)))
    add("model", "malformed config.json", e.train("--model", e.model_copy(
        "badcfg", lambda d: (d / "config.json").write_text("{oops"))))
    add("model", "weights missing from the checkpoint (would be random)", e.train("--model", e.model_copy(
        "missing", _drop_weight)), needle="missing")
    add("model", "truncated safetensors", e.train("--model", e.model_copy("trunc", _truncate)))
    add("model", "pickle .bin that is not weights-only (runs code)", e.train("--model", e.model_copy(
        "evil", _evil_pickle)), needle="not a safe")
    add("model", "--max-input-length beyond the model's positions", e.train("--max-input-length", "100000"),
        needle="positions")
    add("model", "--max-input-length too small for prompt and target", e.train("--max-input-length", "10"),
        needle="too small")
    add("model", "LoRA target module not in the model", e.train("--method", "lora", "--lora-targets", "nope"),
        needle="not found")
    # -- the data
    add("data", "unknown dataset name", e.train(data="nosuchset"), needle="unknown dataset")
    add("data", "dataset file missing", e.train(data=str(e.root / "missing.jsonl")), needle="not found")
    add("data", "invalid JSON line", e.train(data=bad_json), needle="line 2")
    add("data", "line is not a JSON object", e.train(data=not_obj), needle="line 1")
    add("data", "columns of no known format", e.train(data=no_src), needle="columns (src, target)")
    # users' formats (issue 33): a bad row is named by its number, before anything is written
    turn = lambda role, content: {"role": role, "content": content}  # noqa: E731
    good = [{"messages": [turn("user", f"question {i}"), turn("assistant", f"answer {i}")]} for i in range(8)]
    for what, row, needle in [
            ("conversation: a message without a role", {"messages": [{"content": "hi"}, turn("assistant", "x")]},
             "row 3: message 1 of 'messages' has no role"),
            ("conversation: an empty assistant turn", {"messages": [turn("user", "hi"), turn("assistant", " ")]},
             "row 3: message 2 of 'messages' is an empty assistant turn"),
            ("conversation: no assistant turn", {"messages": [turn("user", "hi")]}, "row 3: the conversation has no "
                                                                                    "assistant turn"),
            ("conversation: non-string content", {"messages": [turn("user", "hi"), turn("assistant", 5)]},
             "row 3: message 2 of 'messages' (assistant) has no string content"),
            ("conversation: unknown role", {"messages": [turn("bot", "hi"), turn("assistant", "x")]}, "role 'bot'"),
            ("conversation whose assistant part --max-input-length would cut entirely",
             {"messages": [turn("user", "word " * 400), turn("assistant", "x")]},
             "row 3: the conversation is longer than --max-input-length"),
            ("prompt/completion: an empty completion", {"prompt": "p", "completion": ""}, "row 3: 'completion'"),
            ("alpaca: output not a string", {"instruction": "say", "output": 3}, "row 3: 'output'")]:
        rows = good[:2] + [row] + good[2:] if "messages" in row else \
            [dict(row, **({"completion": f"c{i}", "prompt": f"p{i}"} if "prompt" in row else
                          {"output": f"o{i}", "instruction": f"i{i}"})) for i in range(2)] + [row] + \
            [dict(row, **({"completion": f"c{i}", "prompt": f"p{i}"} if "prompt" in row else
                          {"output": f"o{i}", "instruction": f"i{i}"})) for i in range(2, 8)]
        add("data", what, e.train(data=e.write(f"fmt{len(C)}.jsonl", [json.dumps(r) for r in rows])), needle=needle)
    add("data", "--dataset-format that the rows do not have", e.train("--dataset-format", "messages"),
        needle="'messages' must be a non-empty list")
    add("data", "a hub dataset name while offline", e.train(data="nobody-xyz/no-such-dataset"),
        needle="cannot load 'nobody-xyz/no-such-dataset' from the Hugging Face Hub")
    add("data", "unknown file type", e.train(data=e.write("data.xlsx", ["x"])), needle="unknown file type")
    add("data", "CSV with a ragged row", e.train(data=e.write("ragged.csv", ["source,target", "a,b", "c,d,e,f"])),
        needle="cannot read")
    add("data", "empty target", e.train(data=empty_tgt), needle="target")
    add("data", "'targets' not a list of strings", e.train(data=bad_tgts), needle="targets")
    add("data", "empty file", e.train(data=empty), needle="empty")
    add("data", "not UTF-8", e.train(data=latin1), needle="cannot read")
    add("data", "corrupt .gz", e.train(data=gz), needle="cannot read")
    add("data", "one row: nothing to hold out for evaluation", e.train(data=one_row), needle="--eval-dataset")
    add("data", "--eval-dataset missing", e.train("--eval-dataset", str(e.root / "nope.jsonl")), needle="not found")
    add("data", "--eval-dataset overlaps the training rows", e.train("--eval-dataset", overlap),
        needle="also appear")
    add("data", "--eval-dataset empty", e.train("--eval-dataset", empty), needle="empty")
    add("data", "--eval-dataset with a bundled dataset", e.train("--eval-dataset", fresh, data="scitldr"),
        needle="--eval-dataset")
    # -- numbers
    for opt, val in [("--batch-size", "0"), ("--batch-size", "-2"), ("--epochs", "0"), ("--lr", "0"),
                     ("--lr", "-1"), ("--lr", "inf"), ("--lr", "nan"), ("--lr", "abc"), ("--weight-decay", "-1"),
                     ("--weight-decay", "inf"), ("--weight-decay", "nan"), ("--warmup-steps", "-1"),
                     ("--max-train", "0"), ("--max-eval", "0"), ("--max-new-tokens", "0"), ("--num-beams", "0"),
                     ("--eval-batch-size", "0"), ("--seed", "-1"), ("--epochs", "1.5"), ("--grad-accum", "0"),
                     ("--save-every", "0"), ("--precision", "fp8")]:
        add("numbers", f"{opt} {val}", e.train(opt, val), needle=opt)
    for opt, val, method in [("--rho", "0", "greentrainer"), ("--rho", "1.5", "greentrainer"),
                             ("--rho", "nan", "greentrainer"), ("--rho", "-inf", "greentrainer"),
                             ("--select-every", "0", "greentrainer"), ("--selector-resolution", "1", "greentrainer"),
                             ("--lora-r", "0", "lora"), ("--lora-alpha", "0", "lora"), ("--lora-dropout", "1", "lora"),
                             ("--lora-dropout", "inf", "lora"), ("--prefix-tokens", "0", "prefix"),
                             ("--smt-warmup", "-1", "smt"), ("--smt-params", "0", "smt"),
                             ("--smt-params", "200", "smt"), ("--smt-params", "nan", "smt"),
                             ("--smt-block", "0", "smt")]:
        add("numbers", f"--method {method} {opt} {val}", e.train("--method", method, opt, val), needle=opt)
    add("numbers", "--smt-warmup leaves no sparse step", e.train("--method", "smt", "--smt-warmup", "50"),
        needle="--smt-warmup")
    add("numbers", "infeasible --rho 0.3 (states the smallest feasible)", e.train("--method", "greentrainer",
                                                                                 "--rho", "0.3", "--select-once"),
        needle="smallest feasible")
    # -- choices and contradictions
    add("options", "--packing with --group-by-length", e.train("--packing", "--group-by-length"),
        needle="contradict each other")
    add("options", "--packing with prefix tuning", e.train("--packing", "--method", "prefix"), needle="prefix")
    add("options", "--packing on a model whose attention mixes packed examples (OPT)",
        e.train("--packing", "--model", e.arch_model("opt")), needle="lets packed examples attend to each other")
    add("options", "--fsdp with --precision 16-mixed", e.train("--fsdp", "--precision", "16-mixed"),
        needle="--fsdp does not work with")
    add("options", "--fsdp with --deselected-state cpu",
        e.train("--fsdp", "--method", "greentrainer", "--deselected-state", "cpu"), needle="--fsdp does not work with")
    add("options", "launched with Accelerate's DeepSpeed config", e.train(), needle="pass --fsdp",
        env={"ACCELERATE_USE_DEEPSPEED": "true"})
    add("options", "launched with Accelerate's FSDP config", e.train(), needle="pass --fsdp",
        env={"ACCELERATE_USE_FSDP": "true"})
    add("options", "unknown --method", e.train("--method", "magic"), needle="invalid choice")
    add("options", "unknown --importance", e.train("--method", "greentrainer", "--importance", "x"),
        needle="invalid choice")
    add("options", "unknown --prefix-init", e.train("--method", "prefix", "--prefix-init", "x"),
        needle="invalid choice")
    add("options", "unknown --smt-targets", e.train("--method", "smt", "--smt-targets", "q,zz"), needle="zz")
    add("options", "--device tpu", e.train("--device", "tpu"), needle="--device")
    add("options", "--device cuda without a GPU", e.train("--device", "cuda"), needle="CUDA")
    add("options", "unknown option", e.train("--frobnicate"), needle="unrecognized")
    add("options", "abbreviated option (--rh)", e.train("--rh", "0.5"), needle="unrecognized")
    add("options", "--select-once with --select-every", e.train("--method", "greentrainer", "--select-once",
                                                                "--select-every", "2"), needle="contradict")
    add("options", "--step-policy frontier with --over lora", e.train("--method", "greentrainer", "--over", "lora",
                                                                      "--step-policy", "frontier"), needle="--over lora")
    add("options", "--step-policy fewer with --select-every", e.train("--method", "greentrainer", "--step-policy",
                                                                      "fewer", "--select-every", "2"),
        needle="--select-every")
    add("options", "--step-policy fewer: ρ leaves no full step", e.train("--method", "greentrainer", "--step-policy",
                                                                         "fewer", "--rho", "0.001"), needle="no full step")
    add("options", "--eval-before with --no-eval", e.train("--eval-before", "--no-eval"), needle="contradict")
    add("options", "ρ schedule file missing", e.train("--method", "greentrainer", "--rho-schedule", sched_missing),
        needle="not found")
    add("options", "ρ schedule not UTF-8", e.train("--method", "greentrainer", "--rho-schedule", sched_latin),
        needle="UTF-8")
    add("options", "ρ schedule unreadable entry", e.train("--method", "greentrainer", "--rho-schedule", sched_bad),
        needle="entry")
    add("options", "ρ schedule rho > 1", e.train("--method", "greentrainer", "--rho-schedule", sched_big),
        needle="rho")
    add("options", "ρ schedule rho nan", e.train("--method", "greentrainer", "--rho-schedule", sched_nan),
        needle="rho")
    add("options", "option of another method (--rho with lora): warned, run goes on",
        e.train("--method", "lora", "--rho", "0.5", "--no-eval"), code=0, kind="warn", needle="ignored")
    add("options", "no subcommand", [], needle=None, kind="help")
    add("options", "--gradient-checkpointing with --method prefix", e.train("--method", "prefix",
                                                                           "--gradient-checkpointing"),
        needle="prefix")
    add("options", "--bf16 with --precision 16-mixed", e.train("--bf16", "--precision", "16-mixed"),
        needle="contradict")
    add("options", "--report-to an unknown tracker", e.train("--report-to", "carrier-pigeon"),
        needle="unknown tracker")
    add("options", "--logging-steps 0", e.train("--logging-steps", "0"), needle="--logging-steps")
    add("options", "--eval-steps 0", e.train("--eval-steps", "0"), needle="--eval-steps")
    add("options", "--prompt-format chat with a tokenizer that has no chat template",
        e.train("--prompt-format", "chat"), needle="no chat template")
    add("options", "--prompt-format of an unknown kind", e.train("--prompt-format", "xml"), needle="invalid choice")
    trace_ok = e.write("trace.csv", ["timestamp,gco2_per_kwh", "2024-06-01T00:00:00Z,100", "2024-06-01T01:00:00Z,300"])
    trace_back = e.write("trace_back.csv", ["2024-06-01T01:00:00Z,100", "2024-06-01T00:00:00Z,300"])
    trace_neg = e.write("trace_neg.csv", ["2024-06-01T00:00:00Z,-5"])
    trace_text = e.write("trace_text.csv", ["timestamp,gco2_per_kwh", "noon,high"])
    gt = ("--method", "greentrainer")
    sched_ok = e.write("sched_ok.txt", ["0 0.6"])
    add("carbon", "--carbon-intensity that is neither a number nor a country", e.train("--carbon-intensity", "Mars"),
        needle="--carbon-intensity")
    add("carbon", "--carbon-intensity below zero", e.train("--carbon-intensity", "-1"), needle="≥ 0")
    add("carbon", "--carbon-trace that does not exist", e.train("--carbon-trace", str(e.root / "none.csv")),
        needle="not found")
    add("carbon", "--carbon-trace with timestamps going back", e.train("--carbon-trace", trace_back),
        needle="increase")
    add("carbon", "--carbon-trace with a negative intensity", e.train("--carbon-trace", trace_neg), needle="≥ 0")
    add("carbon", "--carbon-trace with rows that are not timestamp,value", e.train("--carbon-trace", trace_text),
        needle="row 2")
    add("carbon", "--carbon-trace that is a folder", e.train("--carbon-trace", str(e.root)), needle="not found")
    add("carbon", "--carbon-intensity and --carbon-trace together",
        e.train("--carbon-intensity", "100", "--carbon-trace", trace_ok), needle="contradict")
    add("carbon", "--carbon-start outside the trace",
        e.train("--carbon-trace", trace_ok, "--carbon-start", "2030-01-01T00:00:00Z"), needle="outside the trace")
    add("carbon", "--carbon-start that is not a time",
        e.train("--carbon-trace", trace_ok, "--carbon-start", "soon"), needle="ISO 8601")
    add("carbon", "--carbon-time-scale 0", e.train("--carbon-trace", trace_ok, "--carbon-time-scale", "0"),
        needle="--carbon-time-scale")
    add("carbon", "--carbon-aware without a trace", e.train(*gt, "--carbon-aware"), needle="--carbon-trace")
    add("carbon", "--rho-min above --rho-max",
        e.train(*gt, "--carbon-aware", "--carbon-trace", trace_ok, "--rho-min", "0.9", "--rho-max", "0.5"),
        needle="above --rho-max")
    add("carbon", "--rho-min without --carbon-aware", e.train(*gt, "--rho-min", "0.5"), needle="--carbon-aware")
    add("carbon", "--carbon-aware with --rho-schedule",
        e.train(*gt, "--carbon-aware", "--carbon-trace", trace_ok, "--rho-schedule", sched_ok), needle="contradict")
    add("over", "--over of an unknown kind", e.train(*gt, "--over", "everything"), needle="invalid choice")
    add("over", "--over lora with rank 0", e.train(*gt, "--over", "lora", "--lora-r", "0"), needle="--lora-r")
    add("over", "--over lora with a target module the model lacks", e.train(*gt, "--over", "lora", "--lora-targets",
                                                                             "nope"), needle="not found")
    add("over", "--over blocks with an unknown projection", e.train(*gt, "--over", "blocks", "--smt-targets", "qq"),
        needle="--smt-targets")
    add("over", "--over blocks with --smt-block 0", e.train(*gt, "--over", "blocks", "--smt-block", "0"),
        needle="--smt-block")
    add("demo", "demo with --rho 3", ["demo", "--rho", "3", "--output-dir", str(e.out())], needle="--rho")
    add("demo", "demo into a folder that is not a run folder", ["demo", "--output-dir", str(e.user)],
        needle="not a greentrainer run folder")
    for text, what, needle in (("rhoo: 0.5\n", "unknown option", "unknown option"),
                               ("lr: .inf\n", "non-finite number", "finite"),
                               ("rho: [0.5\n", "not YAML", "YAML"), ("- a\n- b\n", "a list", "mapping"),
                               ("method: magic\n", "unknown method", "must be one of")):
        conf = e.write(f"config_{len(C)}.yaml", [text.rstrip("\n")])
        add("config", f"--config file: {what}", ["train", "--config", conf, "--output-dir", str(e.out())],
            needle=needle)
    add("config", "--config file missing", ["train", "--config", str(e.root / "none.yaml")], needle="not found")
    add("resume", "--resume a folder that is not a run folder", ["train", "--resume", str(e.user)],
        needle="not a greentrainer run folder")
    add("resume", "--resume a complete run", ["train", "--resume", "RUN:complete"], needle="already complete")
    add("resume", "--resume a run without checkpoint/", ["train", "--resume", "RUN:failed"],
        needle="no checkpoint")
    add("resume", "--resume with other options", ["train", "--resume", "RUN:failed", "--lr", "1"],
        needle="saved config")
    # -- output folders
    add("output", "--output-dir is a file", e.train(out=Path(a_file)), needle="not a folder")
    add("output", "non-empty folder without --overwrite", e.train(out=e.user), needle="--overwrite")
    add("output", "--output-dir . --overwrite in a user's folder", e.train("--overwrite", out=Path(".")),
        needle="not a greentrainer run folder", cwd=str(e.user))
    add("output", "a git checkout with --overwrite", e.train("--overwrite", out=e.user),
        needle="not a greentrainer run folder")
    add("output", "our run folder holding a user's file, --overwrite", None, needle="did not write",
        setup="foreign")
    add("output", "our run folder with a link to outside, --overwrite: link replaced, target kept", None, code=0,
        kind="ok", setup="symlink")
    # -- eval
    add("eval", "model folder does not exist", ["eval", "--model", "./no/such", "--dataset", e.data],
        needle="not found")
    add("eval", "truncated safetensors", ["eval", "--model", e.model_copy("trunc", _truncate), "--dataset", e.data])
    add("eval", "pickle .bin that is not weights-only", ["eval", "--model", e.model_copy("evil", _evil_pickle),
                                                        "--dataset", e.data], needle="not a safe")
    add("eval", "--output into a missing folder (checked before generating)",
        ["eval", "--model", str(e.model), "--dataset", e.data, "--output", str(e.root / "nope" / "r.json")],
        needle="does not exist")
    add("eval", "--output is a folder", ["eval", "--model", str(e.model), "--dataset", e.data, "--output",
                                         str(e.root)], needle="folder")
    add("eval", "--max-eval 0", ["eval", "--model", str(e.model), "--dataset", e.data, "--max-eval", "0"],
        needle="--max-eval")
    add("eval", "--num-beams -1", ["eval", "--model", str(e.model), "--dataset", e.data, "--num-beams", "-1"],
        needle="--num-beams")
    add("eval", "unknown dataset", ["eval", "--model", str(e.model), "--dataset", "nosuchset"],
        needle="unknown dataset")
    add("eval", "a run folder whose status is failed: warning, status in the output",
        ["eval", "--model", "RUN:failed", "--dataset", e.data, "--num-beams", "1", "--max-new-tokens", "2"],
        code=0, kind="warn", needle="status 'failed'")
    add("eval", "a run folder without model/", ["eval", "--model", "RUN:nomodel", "--dataset", e.data],
        needle="no saved model")
    add("eval", "adapter folder with an unreadable adapter_config.json",
        ["eval", "--model", e.model_copy("badadapter", lambda d: (d / "adapter_config.json").write_text("{")),
         "--dataset", e.data], needle="adapter")
    add("eval", "--eval-dataset with the run's own training rows",
        ["eval", "--model", "RUN:complete", "--dataset", e.data, "--eval-dataset", e.data], needle="also appear")
    # -- profile
    for opt, val in [("--batch-size", "0"), ("--seq-len", "-1"), ("--target-len", "0"), ("--seq-len", "nan")]:
        add("profile", f"{opt} {val}", ["profile", "--model", str(e.model), opt, val], needle=opt)
    add("profile", "unknown model", ["profile", "--model", "./no/such"], needle="not found")
    add("profile", "malformed config.json", ["profile", "--model", e.model_copy(
        "badcfg", lambda d: (d / "config.json").write_text("{oops"))])
    # -- the Trainer callback (library use: a UsageError with a one-line message)
    add("callback", "GreenTrainerCallback(rho=1.5)", {"rho": 1.5}, runner="callback", needle="--rho")
    add("callback", "GreenTrainerCallback(rho=nan)", {"rho": float("nan")}, runner="callback", needle="finite")
    add("callback", "GreenTrainerCallback(importance='x')", {"importance": "x"}, runner="callback",
        needle="--importance")
    add("callback", "GreenTrainerCallback(select_every=0)", {"select_every": 0}, runner="callback",
        needle="--select-every")
    add("callback", "GreenTrainerCallback(seq_len=0)", {"seq_len": 0}, runner="callback", needle="seq_len")
    # -- a run folder a live run is writing (issue 38): refused, the live run untouched
    add("run folder", "a second launch on a live run's folder", e.train(out="RUN:live"), setup="live",
        needle="still running (pid")
    add("run folder", "a second launch on a live run's folder with --overwrite", e.train("--overwrite", out="RUN:live"),
        setup="live", needle="still running (pid")
    add("run folder", "--resume of a run that is still running", ["train", "--resume", "RUN:live", "--no-progress"],
        setup="live", needle="the run is still running (pid")
    add("run folder", "--resume after the data file changed", ["train", "--resume", "RUN:changed", "--no-progress"],
        setup="changed", needle="changed since the run started")
    # -- faults during a run (subprocesses)
    add("fault", "huge lr: non-finite loss → stops naming the step, run failed",
        e.train("--lr", "1e30", "--epochs", "3"), code=1, kind="fault", needle="non-finite", runner="sub")
    add("fault", "disk full while saving the model (file-size limit)", e.train("--epochs", "1"), code=1,
        kind="fault", needle="File too large", runner="sub", fsize=150_000)
    add("fault", "SIGTERM during training → interrupted, model saved", e.train("--epochs", "500", "--no-eval"),
        code=143, kind="interrupted", runner="sub", signal=signal.SIGTERM)
    add("fault", "Ctrl-C (SIGINT) during training → interrupted, model saved",
        e.train("--epochs", "500", "--no-eval"), code=130, kind="interrupted", runner="sub", signal=signal.SIGINT)
    return C


def _drop_weight(d: Path) -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(d / "model.safetensors")
    sd.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _truncate(d: Path) -> None:
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def _evil_pickle(d: Path) -> None:
    import torch
    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Evil()}, d / "pytorch_model.bin")


def run_case(env: Env, c: dict) -> dict:
    argv = c["argv"]
    sentinel = env.user / "notes.txt"
    before = sentinel.read_text()
    out = None
    if isinstance(argv, list):
        argv = [env.run_folder(a.split(":")[1]) if a in ("RUN:failed", "RUN:complete") else a for a in argv]
        if "RUN:nomodel" in argv:
            d = Path(env.run_folder("nomodel"))
            shutil.rmtree(d / "model", ignore_errors=True)
            argv = [str(d) if a == "RUN:nomodel" else a for a in argv]
        if "--output-dir" in argv:
            out = Path(argv[argv.index("--output-dir") + 1])
    if c["kw"].get("setup") in ("foreign", "symlink"):
        out = env.out()
        _in_process(env.train("--no-eval", out=out))
        if c["kw"]["setup"] == "foreign":
            (out / "my_notes.txt").write_text("mine")
        else:
            (env.root / "precious").mkdir(exist_ok=True)
            (env.root / "precious" / "keep.txt").write_text("keep")
            (out / "predictions.jsonl").symlink_to(env.root / "precious")
        argv = env.train("--overwrite", "--no-eval", out=out)
    live = None
    if c["kw"].get("setup") == "live":  # a run still training in that folder (another process)
        out = env.out()
        live = subprocess.Popen([sys.executable, "-m", "greentrainer.cli", *env.train("--epochs", "500", "--no-eval",
                                                                                      out=out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "metrics.json").is_file() and live.poll() is None:
            time.sleep(0.05)
        live_config = (out / "train_config.json").read_text()
        argv = [str(out) if a == "RUN:live" else a for a in argv]
    if c["kw"].get("setup") == "changed":  # a run killed after a checkpoint, then its data file edited
        out = env.out()
        name = f"changing_{out.name}.jsonl"
        data = env.write(name, [json.dumps(r) for r in ROWS])
        proc = subprocess.Popen([sys.executable, "-m", "greentrainer.cli",
                                 *env.train("--epochs", "500", "--no-eval", "--save-every", "2", out=out, data=data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not (out / "checkpoint" / "meta.json").is_file():
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        env.write(name, [json.dumps(dict(r, target=r["target"] + " edited")) for r in ROWS])
        argv = [str(out) if a == "RUN:changed" else a for a in argv]
    existed = out is not None and out.exists()
    t0 = time.perf_counter()
    if c["runner"] == "callback":
        rc, so, se = _callback(argv)
    elif c["runner"] == "sub":
        rc, so, se = _subprocess(argv, c["kw"].get("signal"), c["kw"].get("fsize"))
    else:
        cwd = c["kw"].get("cwd")
        old, old_env = os.getcwd(), dict(os.environ)
        if cwd:
            os.chdir(cwd)
        os.environ.update(c["kw"].get("env", {}))  # e.g. what `accelerate launch` sets for its config
        try:
            rc, so, se = _in_process(argv)
        finally:
            os.chdir(old)
            os.environ.clear()
            os.environ.update(old_env)
    lines = [ln for ln in se.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith("greentrainer: warning:")]
    problems = []
    if rc != c["code"] and not (c["kind"] == "help" and rc == 2):
        problems.append(f"exit {rc}, expected {c['code']}")
    if "Traceback" in se:
        problems.append("traceback")
    if c["kind"] in ("usage", "fault", "interrupted") and len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    if c["needle"] and c["needle"] not in se:
        problems.append(f"message lacks {c['needle']!r}")
    if sentinel.read_text() != before or not (env.user / ".git").is_dir():
        problems.append("the user's files changed")
    if c["kind"] == "usage" and out is not None and not existed and out.exists():
        problems.append("output folder created")
    if c["kind"] in ("fault", "interrupted"):
        try:
            st = json.loads((out / "metrics.json").read_text())["status"]
        except (OSError, ValueError, KeyError, TypeError):
            st = "unreadable"
        want = "failed" if c["kind"] == "fault" else "interrupted"
        if st != want:
            problems.append(f"status {st!r}, expected {want!r}")
        if (out / "model.tmp").exists():
            problems.append("a partial model.tmp was left")
        if c["kind"] == "interrupted" and not (out / "model" / "model.safetensors").is_file():
            problems.append("the model was not saved")
    if live is not None:
        if live.poll() is not None or (out / "train_config.json").read_text() != live_config:
            problems.append("the live run was disturbed")
        live.kill()
        live.wait()
    if c["kw"].get("setup") == "symlink" and not (env.root / "precious" / "keep.txt").exists():
        problems.append("followed a link out of the run folder")
    if c["kw"].get("setup") == "foreign" and not (out / "my_notes.txt").exists():
        problems.append("deleted the user's file")
    msg = (errors or lines or ["(no message)"])[-1]
    return {"area": c["area"], "input or fault": c["what"], "exit": rc, "message": msg[:160].replace("|", "/"),
            "outcome": "one line, exit code, nothing lost" if not problems else "PROBLEM: " + "; ".join(problems),
            "ok": not problems, "seconds": round(time.perf_counter() - t0, 2)}


def _callback(kwargs) -> tuple[int, str, str]:
    from greentrainer.callback import GreenTrainerCallback
    from greentrainer.errors import UsageError
    try:
        GreenTrainerCallback(**kwargs)
    except UsageError as e:
        return 2, "", f"greentrainer: error: {e}\n"
    return 0, "", ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        env = Env(Path(tmp))
        all_cases = cases(env)
        if a.quick:
            all_cases = all_cases[::8]
        rows = []
        from tqdm.auto import tqdm
        for c in tqdm(all_cases, desc="bad inputs", file=sys.stderr):
            rows.append(run_case(env, c))
    bad = [r for r in rows if not r["ok"]]
    name = "bad_inputs_quick" if a.quick else "bad_inputs"
    write_results(name, f"Bad inputs and faults: {len(rows)} kinds, {len(rows) - len(bad)} handled",
                  rows, ["area", "input or fault", "exit", "message", "outcome"],
                  notes="Each row: the exit code, the last line on stderr, and whether it was one line with the "
                        "right exit code, no traceback, the user's files untouched, no output folder left by a "
                        "refused command, and faults recorded as `failed`/`interrupted` in metrics.json. "
                        "Exit codes: 2 bad input, 1 fault during a run, 130 Ctrl-C, 143 SIGTERM, 0 warned and ran.")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
