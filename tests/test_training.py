
import pytest
import torch

from conftest import make_tiny
from greentrainer.config import TrainConfig, config_from_options
from greentrainer.methods.greentrainer import GreenTrainerConfig
from greentrainer.data import Example, collate, encode_all
from greentrainer.errors import UsageError
from greentrainer.importance import probe_importance
from greentrainer.loop import train
from greentrainer.methods import build_method
from greentrainer.models import tiny_tokenizer

TOK = tiny_tokenizer()


def examples(n=16):
    return [Example(source=f"the quick brown fox {i} jumps over the lazy dog", target=f"fox {i % 3}",
                    targets=[f"fox {i % 3}"]) for i in range(n)]


def encoded(model, n=16):
    return encode_all(examples(n), TOK, "summarization", model.config.is_encoder_decoder, 64)


@pytest.mark.parametrize("arch", ["llama", "opt", "t5"])
def test_a_few_full_steps_lower_the_loss_on_a_fixed_batch(arch):
    model = make_tiny(arch)
    batch = collate(encoded(model, 4), TOK.pad_token_id, model.config.is_encoder_decoder)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert model(**batch).loss.item() < 0.8 * first


def run(method_name, model, epochs=2, **gt):
    gt.setdefault("full_warmup_steps", 0)  # the paper's GreenTrainer unless a test asks for the warm-up
    gt.setdefault("step_policy", "select")  # (the default "auto" trains full steps for ρ of the run)
    cfg = TrainConfig(method=method_name, epochs=epochs, batch_size=4, lr=1e-3, seed=0,
                      method_config=GreenTrainerConfig(**gt) if method_name == "greentrainer" else None)
    data = encoded(model)
    method = build_method(cfg)
    out = train(model, TOK, method, data, data[:4], cfg, torch.device("cpu"), log=lambda *a: None, progress=False)
    return out, method


def test_full_fine_tuning_measures_exactly_the_full_reference():
    out, _ = run("full", make_tiny("llama"), epochs=1)
    t = out["totals"]
    assert t["flops_total"] == t["flops_full_ft_reference"] > 0
    assert t["flops_backward"] == 2 * t["flops_forward"]


def test_top2_freezes_all_but_output_embedding_and_final_norm():
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, _ = run("top2", model, epochs=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.embed_tokens.weight", "model.norm.weight"}  # lm_head is tied to embed_tokens
    assert out["totals"]["trainable_params"] == sum(before[n].numel() for n in changed)


def test_greentrainer_stays_within_rho_and_newly_selected_tensors_train():
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, method = run("greentrainer", model, epochs=3, rho=0.7)
    t = out["totals"]
    assert t["flops_total"] <= 0.7 * t["flops_full_ft_reference"]
    assert t["flops_overhead"] > 0  # the probes are counted
    selected_ever = {n for s in method.selections for n in s["selected"]}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == selected_ever
    # every selection's tensors received updates while they were selected
    assert all(len(s["selected"]) > 0 for s in method.selections) and len(method.selections) == 3


def test_greentrainer_rejects_an_infeasible_rho_with_the_smallest_feasible_one():
    from greentrainer.errors import UsageError
    with pytest.raises(UsageError, match=r"smallest feasible rho is 0\.\d+"):
        run("greentrainer", make_tiny("llama"), epochs=1, rho=0.34, select_once=True)


def _train_fixed_selection(with_probe: bool):
    torch.manual_seed(0)
    model = make_tiny("llama")
    names = [n for n, _ in model.named_parameters()]
    chosen = {names[-1], names[-2], names[3]}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    from transformers import get_linear_schedule_with_warmup
    sched = get_linear_schedule_with_warmup(opt, 1, 10)
    data = encoded(model, 8)
    batch = collate(data[:4], TOK.pad_token_id, False)
    probe_batch = collate(data[4:], TOK.pad_token_id, False)
    order = list(reversed(names))
    for step in range(4):
        if with_probe:
            probe_importance(model, opt, sched, probe_batch, order, len(order) - 1)
        for n, p in model.named_parameters():
            p.requires_grad_(n in chosen)
        model(**batch).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, torch.rand(3)


def test_probe_leaves_no_trace():
    a, opt_a, rng_a = _train_fixed_selection(True)
    b, opt_b, rng_b = _train_fixed_selection(False)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key in sa["state"][k]:
            assert torch.equal(sa["state"][k][key], sb["state"][k][key])
    assert torch.equal(rng_a, rng_b)


def test_probe_stops_early_and_reports_gradient_memory():
    model = make_tiny("llama")
    names = [n for n, _ in model.named_parameters()][::-1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = collate(encoded(model, 4), TOK.pad_token_id, False)
    res = probe_importance(model, opt, None, batch, names, 3)
    assert (res["importance"][4:] == 0).all() and res["grad_bytes"] < res["grad_bytes_full"]
    assert abs(res["importance"]).max() == pytest.approx(1.0)


def tiny_trainer(model, tmp_path, n_items, callbacks=(), **overrides):
    """A transformers Trainer over ``n_items`` tiny examples (batch 4, lr 1e-3, CPU, nothing saved or logged
    unless ``overrides`` say so)."""
    from transformers import Trainer, TrainingArguments
    from greentrainer.data import Encoded
    data = [dict(input_ids=e.input_ids, labels=e.labels) for e in encoded(model, n_items)]

    def collator(items):
        return collate([Encoded(i["input_ids"], i["labels"], []) for i in items], TOK.pad_token_id, False)

    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-3,
              report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True)
    kw.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kw), train_dataset=data, data_collator=collator,
                   callbacks=list(callbacks))


def test_transformers_trainer_callback(tmp_path):
    from greentrainer.callback import GreenTrainerCallback
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = GreenTrainerCallback(rho=0.7, full_warmup_steps=0, log=lambda *a: None)  # the paper's selections only
    tiny_trainer(model, tmp_path, 16, [cb], num_train_epochs=3).train()
    assert len(cb.selections) == 3
    later = set(cb.selections[1]["selected"]) | set(cb.selections[2]["selected"])
    only_later = later - set(cb.selections[0]["selected"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set().union(*(s["selected"] for s in cb.selections))
    assert only_later <= changed
    # within ρ; measuring full FT's cost on the weightless copy (once per batch shape) is not counted as work
    f = cb.flops
    assert f["steps"] + f["probes"] <= 0.7 * f["full_ft_reference"]


def test_select_every_k_steps_and_rho_schedule(tmp_path):
    sched = tmp_path / "rho.json"
    sched.write_text('{"0": 0.8, "4": 0.7}')
    out, method = run("greentrainer", make_tiny("llama"), epochs=2, rho=0.8, select_every=2,
                      rho_schedule=str(sched))
    assert [s["step"] for s in method.selections] == [0, 2, 4, 6]
    assert [s["rho"] for s in method.selections] == [0.8, 0.8, 0.7, 0.7]
    t = out["totals"]
    assert t["flops_total"] <= 0.8 * t["flops_full_ft_reference"]


def test_importance_metric_variants():
    from greentrainer.importance import importance_scores
    dw = [torch.tensor([-1.0, 2.0]), torch.tensor([0.5, 0.0])]
    g = [torch.tensor([1.0, -1.0]), torch.tensor([-2.0, 3.0])]
    assert importance_scores(dw, g, "dw_grad").tolist() == pytest.approx([1.0, 1 / 3])   # -Σ Δw·g, / max
    assert importance_scores(dw, g, "dw").tolist() == pytest.approx([1.0, 1 / 6])      # Σ |Δw|
    assert importance_scores(dw, g, "grad").tolist() == pytest.approx([2 / 13, 1.0])   # Σ g²


def test_all_importances_zero_fall_back_to_a_non_empty_selection():
    from greentrainer.flops import profile_config
    from greentrainer.methods.greentrainer import select_step
    model = make_tiny("llama")
    prof = profile_config(model.config, 4, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)  # the probe step moves nothing
    batch = collate(encoded(model, 4), TOK.pad_token_id, False)
    logs = []
    chosen, rec = select_step(model, opt, None, batch, prof, 0.8, 100, log=logs.append)
    assert chosen and "note" in rec and "every importance" in logs[0]
    prev = chosen[:1]
    chosen2, rec2 = select_step(model, opt, None, batch, prof, 0.8, 100, previous=prev, log=logs.append)
    assert chosen2 == prev and "keeping the previous selection" in rec2["note"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(prev)


def test_mean_padded_size_of_random_batches():
    from greentrainer.data import Encoded
    from greentrainer.data import mean_padded_size
    same = [Encoded(input_ids=[0] * 6, labels=[0] * 2, prompt_ids=[]) for _ in range(8)]
    assert mean_padded_size(same, 4, False) == 6 and mean_padded_size(same, 4, True) == 8
    mixed = [Encoded(input_ids=[0] * n, labels=[], prompt_ids=[]) for n in (2, 2, 2, 10)]
    # batches of 2: the one holding the 10-token item pads to 10, the other to 2
    assert mean_padded_size(mixed, 2, False) == 6


@pytest.mark.parametrize("policy", ["select", "fewer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greentrainer_stays_within_rho_on_batches_of_uneven_length(seed, policy):
    """Most batches are shorter than the profiled (90th-percentile) shape: the probe and any overspend must
    be repaid out of what those real steps allow, not out of the profiled step's budget; "fewer" counts its full
    steps on the run's own batches (ρ of the steps would overspend when the first batches are the long ones)."""
    import random
    rng = random.Random(seed)
    exs = [Example(source=" ".join(["word"] * rng.choice([2, 3, 4, 40])), target="fox", targets=["fox"])
           for _ in range(24)]
    model = make_tiny("llama")
    data = encode_all(exs, TOK, "summarization", False, 256)
    cfg = TrainConfig(method="greentrainer", epochs=2, batch_size=4, lr=1e-3, seed=seed,
                      method_config=GreenTrainerConfig(rho=0.6, step_policy=policy))
    out = train(model, TOK, build_method(cfg), data, data[:4], cfg, torch.device("cpu"), log=lambda *a: None,
                progress=False)
    t = out["totals"]
    assert t["flops_total"] <= 0.6 * t["flops_full_ft_reference"]
    if policy == "fewer":
        n = sum(h["steps_by_kind"]["full"] for h in out["history"])
        assert 0 < n < out["totals"]["steps"]


@pytest.mark.parametrize("method", ["full", "greentrainer", "smt", "lora"])
def test_cached_step_counts_equal_live_counting(method):
    """Counting each (batch shape, trainable set) once gives the same FLOPs as counting every step."""
    totals = []
    for live in (True, False):
        cfg = config_from_options(dict(method=method, epochs=2, batch_size=4, lr=1e-3, seed=0, rho=0.8,
                                       smt_warmup=2, smt_block=16))
        data = encoded(make_tiny("llama"))
        model = make_tiny("llama")
        out = train(model, TOK, build_method(cfg), data, data[:4], cfg, torch.device("cpu"), log=lambda *a: None,
                    progress=False, live_counting=live)
        totals.append({k: out["totals"][k] for k in ("flops_forward", "flops_backward", "flops_overhead")})
    assert totals[0] == totals[1]


@pytest.mark.parametrize("setting", ["gradient_checkpointing", "gradient_accumulation"])
def test_trainer_callback_with_checkpointing_or_accumulation(tmp_path, setting):
    """Under the Trainer's gradient checkpointing the backward still stops at the selection (transformers'
    input-grad hook is removed, the recompute is budgeted); under accumulation the probe steps the real
    optimizer over the step's micro-batches (importances are not all zero) and the budget counts them."""
    from greentrainer.callback import GreenTrainerCallback
    model = make_tiny("llama")
    extra = {"gradient_checkpointing": True} if setting == "gradient_checkpointing" else \
        {"gradient_accumulation_steps": 2}
    cb = GreenTrainerCallback(rho=0.7, log=lambda *a: None)
    tiny_trainer(model, tmp_path, 64, [cb], **extra).train()
    probes = [s for s in cb.selections if s["kind"] == "probe"]  # after the full fine-tuning warm-up
    assert cb.selections[0]["kind"] == "warm-up" and len(probes) == 2 and all(s["n_selected"] > 0 for s in probes)
    assert all(any(x != 0 for x in s["importance"]) for s in probes)
    assert cb.flops["steps"] + cb.flops["probes"] <= 0.7 * cb.flops["full_ft_reference"]
    if setting == "gradient_checkpointing":
        assert not hasattr(model, "_require_grads_hook")
        from greentrainer.flops import profile_config
        plain = profile_config(model.config, cb.profile.batch_size, cb.profile.seq_len)
        assert cb.profile.t_full > plain.t_full  # the recompute is budgeted
    else:
        assert cb.accum == 2


def test_trainer_callback_state_travels_with_trainer_checkpoints(tmp_path):
    from greentrainer.callback import GreenTrainerCallback
    cb = GreenTrainerCallback(rho=0.7, log=lambda *a: None)
    tiny_trainer(make_tiny("llama"), tmp_path, 32, [cb], save_strategy="epoch").train()
    ckpt = sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    restored = GreenTrainerCallback(rho=0.7, log=lambda *a: None)
    restored.load_state(str(ckpt))
    n = len(restored.selections)  # the warm-up and the selection after it, at the end of epoch 1
    assert n == 2 and [s["selected"] for s in restored.selections] == [s["selected"] for s in cb.selections[:n]]
    assert restored.current == cb.selections[n - 1]["selected"]


def test_trainer_callback_logs_measured_flops_for_the_loggers(tmp_path):
    """attach() puts the callback first, so a logger behind it (like report_to's) sees measured FLOPs and the
    fraction of full fine-tuning; full fine-tuning's reference is measured on the same batches."""
    from transformers import TrainerCallback
    from greentrainer.callback import GreenTrainerCallback

    class Logger(TrainerCallback):
        seen = []

        def on_log(self, args, state, control, logs=None, **kw):
            self.seen.append(dict(logs))

    trainer = tiny_trainer(make_tiny("llama"), tmp_path, 64, [Logger()], logging_strategy="steps", logging_steps=4)
    cb = GreenTrainerCallback(rho=0.7, log=lambda *a: None).attach(trainer)
    trainer.train()
    logged = [x for x in Logger.seen if "greentrainer/flops_fraction_of_full" in x]
    assert logged and all(float(x["greentrainer/flops_fraction_of_full"]) > 0 for x in logged)
    assert cb.flops["steps"] > 0 and cb.flops["probes"] > 0 and cb.flops["full_ft_reference"] > 0
    # over the run, the measured FLOPs (steps and probes) stay within rho of full fine-tuning's on the same batches
    assert cb.flops["steps"] + cb.flops["probes"] <= 0.7 * cb.flops["full_ft_reference"]
    assert cb.report["within_budget"] is True  # and the report says so


def test_eval_steps_records_a_validation_curve_without_changing_training():
    """--eval-steps N: the validation loss before training and every N optimizer steps (the curve the learning-
    speed measurements use); the weights are the same as without it."""
    weights = []
    for every in (None, 2):
        model = make_tiny("llama")
        cfg = TrainConfig(method="greentrainer", epochs=2, batch_size=4, lr=1e-3, seed=0, eval_steps=every,
                          method_config=GreenTrainerConfig(rho=0.8))
        data = encoded(model)
        out = train(model, TOK, build_method(cfg), data, data[:4], cfg, torch.device("cpu"), log=lambda *a: None,
                    progress=False)
        weights.append({n: p.detach().clone() for n, p in out["model"].named_parameters()})
    curve = [pt for h in out["history"] for pt in h["val_curve"]]
    steps_per_epoch = out["history"][0]["steps"]
    assert [s for s, *_ in curve] == [0] + list(range(2, 2 * steps_per_epoch + 1, 2))
    assert curve[-1][1] == out["history"][-1]["val_loss"]
    flops = [f for _, _, f, _ in curve]  # the FLOPs spent by each point, and full FT's on the same batches
    assert flops[0] == 0 and flops == sorted(flops) and flops[-1] == out["totals"]["flops_total"]
    assert curve[-1][3] == out["totals"]["flops_full_ft_reference"]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_full_fine_tuning_warm_up_is_repaid_within_rho():
    """--full-warmup-steps K: every tensor trains for the first K steps without a probe; the selections after
    them repay the extra FLOPs over the rest of the run, so the run as a whole stays within ρ."""
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out, method = run("greentrainer", model, epochs=3, rho=0.8, full_warmup_steps=1)
    first = method.selections[0]
    assert first["note"] == "full fine-tuning warm-up" and first["n_selected"] == len(method.names)
    assert method.selections[1]["step"] == 1 and method.selections[1]["n_selected"] < len(method.names)
    assert all(not torch.equal(p, before[n]) for n, p in out["model"].named_parameters())  # all trained once
    t = out["totals"]
    assert t["flops_total"] <= 0.8 * t["flops_full_ft_reference"]


def test_the_default_warm_up_is_an_eighth_of_the_run_and_what_the_budget_can_repay():
    out, method = run("greentrainer", make_tiny("llama"), epochs=4, rho=0.8, full_warmup_steps=None)
    steps = out["totals"]["steps"]
    assert method.warmup == steps // 8 >= 1 and method.selections[0]["note"] == "full fine-tuning warm-up"
    assert out["totals"]["flops_total"] <= 0.8 * out["totals"]["flops_full_ft_reference"]
    # near the smallest feasible ρ the rest of a run cannot repay an eighth of it: the warm-up is capped
    from greentrainer.methods.greentrainer import GreenTrainerMethod
    from greentrainer.selection import min_feasible_rho
    from greentrainer.engine.reference import run_profile
    prof = run_profile(make_tiny("llama").config, (4, 64, None), False)
    lo = min_feasible_rho(prof.t_dws, prof.t_dys, prof.t_fp, prof.t_full, branches=prof.branch_tuples)
    tight = GreenTrainerMethod(GreenTrainerConfig(rho=lo + 0.05, step_policy="select"))
    tight.check(make_tiny("llama"), prof, 1000, 1000)
    assert 0 < tight.warmup < 1000 // 8


def test_a_warm_up_that_cannot_be_repaid_is_refused():
    from greentrainer.errors import UsageError
    with pytest.raises(UsageError, match="cannot repay"):
        run("greentrainer", make_tiny("llama"), epochs=2, rho=0.6, full_warmup_steps=7)


def test_trainer_callback_probe_over_several_batches_is_paid_within_rho(tmp_path):
    """probe_batches=K: each probe averages K steps' batches, costs about K times the FLOPs, and the run
    still stays within ρ of full fine-tuning's FLOPs on the same batches; K < 1 is refused."""
    from greentrainer.callback import GreenTrainerCallback
    from greentrainer.errors import UsageError
    probes = {}
    for k in (1, 2):
        cb = GreenTrainerCallback(rho=0.7, probe_batches=k, log=lambda *a: None)
        tiny_trainer(make_tiny("llama"), tmp_path, 64, [cb]).train()
        assert [s.get("probe_batches") for s in cb.selections if s["kind"] == "probe"] == [k, k]
        assert cb.flops["steps"] + cb.flops["probes"] <= 0.7 * cb.flops["full_ft_reference"]
        probes[k] = cb.flops["probes"]
    assert probes[2] > 1.5 * probes[1]
    with pytest.raises(UsageError, match="probe-batches"):
        GreenTrainerCallback(probe_batches=0)


def test_trainer_callback_under_fp16_with_a_gradient_scaler(tmp_path):
    """fp16: the Trainer's optimizer is wrapped with a GradScaler, whose step() would refuse the probe's step (no
    inf checks recorded for it). On CPU Accelerate makes no scaler, so a real one is put in before training."""
    from greentrainer.callback import GreenTrainerCallback
    cb = GreenTrainerCallback(rho=0.7, log=lambda *a: None)
    trainer = tiny_trainer(make_tiny("llama"), tmp_path, 64, [cb], fp16=True)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    assert trainer.optimizer.scaler is not None  # the Trainer really stepped through the scaler
    probes = [s for s in cb.selections if s["kind"] == "probe"]
    assert len(probes) == 2 and all(any(x != 0 for x in s["importance"]) for s in probes)


def test_trainer_callback_starts_with_full_fine_tuning_repaid_within_rho(tmp_path):
    """As the CLI: the first 1/8 of the run trains every tensor without a probe, the selections after it repay
    the extra FLOPs (the run stays within ρ, measured), every tensor changes in the warm-up; 0 gives the
    paper's method; a warm-up the rest cannot repay is refused."""
    from greentrainer.callback import GreenTrainerCallback
    from greentrainer.errors import UsageError
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = GreenTrainerCallback(rho=0.6, log=lambda *a: None)
    tiny_trainer(model, tmp_path, 64, [cb], num_train_epochs=2).train()  # 32 steps: 4 of warm-up
    assert cb.warmup == 4 and [(s["kind"], s["step"]) for s in cb.selections] == [("warm-up", 0), ("probe", 4),
                                                                                   ("probe", 16)]
    assert cb.selections[0]["n_selected"] == len(cb.profile.names)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # all trained, in the warm-up
    assert cb.flops["steps"] + cb.flops["probes"] <= 0.6 * cb.flops["full_ft_reference"]
    paper = GreenTrainerCallback(rho=0.6, full_warmup_steps=0, log=lambda *a: None)
    tiny_trainer(make_tiny("llama"), tmp_path, 64, [paper]).train()
    assert paper.warmup == 0 and all(s["kind"] == "probe" for s in paper.selections)
    with pytest.raises(UsageError, match="full_warmup_steps 30"):
        tiny_trainer(make_tiny("llama"), tmp_path, 64, [GreenTrainerCallback(rho=0.6, full_warmup_steps=30)]).train()


def test_full_warm_up_from_the_command_line_writes_its_selection_records(tmp_path, tiny_model_dir, data):
    import json
    from conftest import train_args
    from greentrainer.cli import main
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--method", "greentrainer", "--rho", "0.8", "--epochs", "3",
                           "--full-warmup-steps", "1", "--no-eval", "--lr", "1e-3")) == 0
    sels = json.loads((out / "selections.json").read_text())["selections"]
    assert sels[0]["note"] == "full fine-tuning warm-up" and len(sels) >= 2
    assert (out / "selection_heatmap.png").is_file()
    totals = json.loads((out / "metrics.json").read_text())["totals"]
    assert totals["flops_fraction_of_full"] <= 0.8


def test_a_run_above_its_flops_budget_says_so(tmp_path, tiny_model_dir, data, monkeypatch, capsys):
    """metrics.json records the FLOPs the run's ρ allowed and whether it kept to them; a run that did not ends
    with a warning (here the allowance is cut to a tenth behind the method's back)."""
    import json
    from conftest import train_args
    from greentrainer.cli import main
    from greentrainer.methods.greentrainer import GreenTrainerMethod
    monkeypatch.setattr(GreenTrainerMethod, "flops_allowed", lambda self, reference: 0.1 * reference)
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, out, "--method", "greentrainer", "--rho", "0.8", "--no-eval",
                           "--quiet")) == 0
    totals = json.loads((out / "metrics.json").read_text())["totals"]
    assert totals["within_budget"] is False and totals["flops_allowed_fraction"] == pytest.approx(0.1)
    assert "above the 10.0% its ρ allowed" in capsys.readouterr().out  # a warning: --quiet keeps it


@pytest.mark.parametrize("select_every", [None, 2, 3])
def test_the_default_warm_up_and_short_last_windows_stay_within_rho(select_every):
    """The warm-up ends mid-epoch (or on a selection point), and the last selection governs only the steps
    left: each selection pays its probe from the steps it really governs, so the run stays within ρ."""
    out, method = run("greentrainer", make_tiny("llama"), epochs=4, rho=0.75, select_every=select_every,
                      full_warmup_steps=None)
    t = out["totals"]
    assert t["flops_total"] <= 0.75 * t["flops_full_ft_reference"]
    assert t["within_budget"] and t["flops_allowed_fraction"] == pytest.approx(0.75)
    if select_every is None:
        assert method.warmup == 2 and method.selections[0]["kind"] == "warm-up"


@pytest.mark.parametrize("extra", [{"probe_batches": 2}, {"select_every": 2}])
def test_the_warm_up_leaves_room_for_the_probes_after_it(extra):
    """The warm-up is capped so that the steps after it can repay it *and* pay their probes (many, or large):
    the run stays within ρ (the default model at ρ 0.5 measured 55.9 % with a 4-batch probe when the cap left
    the probes out; here a 2-batch probe after the warm-up found no budget at all and the probe crashed)."""
    out, method = run("greentrainer", make_tiny("llama"), epochs=4, rho=0.75, full_warmup_steps=None, **extra)
    t = out["totals"]
    assert t["flops_total"] <= 0.75 * t["flops_full_ft_reference"]
    # bigger probes, or more of them, leave less room for the warm-up
    prof = method.profile
    most = {(w, k): _most_warmup(prof, 0.75, 64, w, k) for w, k in ((64, 1), (64, 4), (4, 1))}
    assert most[(64, 1)] > most[(64, 4)] and most[(64, 1)] > most[(4, 1)]


def _most_warmup(profile, rho, total, window, probe_batches):
    """The largest warm-up warmup_steps accepts (it refuses one step more)."""
    from greentrainer.errors import UsageError
    from greentrainer.methods.greentrainer import warmup_steps
    for w in range(total, -1, -1):
        try:
            return warmup_steps(profile, rho, total, w, window=window, probe_batches=probe_batches)
        except UsageError:
            continue


def test_callback_reports_energy_and_co2_against_full_fine_tuning(tmp_path):
    """The Trainer's logs and the callback's report carry the training's energy, its CO2 at the given intensity
    and full fine-tuning's on the same batches (energy per FLOP × its FLOPs); one summary line at the end."""
    from transformers import TrainerCallback
    from greentrainer.callback import GreenTrainerCallback
    from greentrainer.energy import parse_intensity
    seen, lines = [], []

    class Logger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

    trainer = tiny_trainer(make_tiny("llama"), tmp_path, 16, [Logger()], logging_strategy="steps", logging_steps=2)
    cb = GreenTrainerCallback(rho=0.7, carbon_intensity="DEU", log=lines.append).attach(trainer)
    trainer.train()
    logged = [h for h in seen if "greentrainer/energy_kwh" in h]
    assert logged and all(h["greentrainer/energy_kwh"] > 0 for h in logged)
    r, g = cb.report, parse_intensity("DEU")[0]
    assert r["energy_kwh"] >= logged[-1]["greentrainer/energy_kwh"] > 0
    assert r["co2_g"] == pytest.approx(r["energy_kwh"] * g)
    assert r["energy_full_ft_reference_kwh"] == pytest.approx(r["energy_kwh"] / r["flops_fraction_of_full"])
    assert r["co2_full_ft_reference_g"] > r["co2_g"] and r["energy"]["kind"] in ("measured", "partly measured",
                                                                                  "estimated")
    assert "% of full fine-tuning" in lines[-1] and "CO2eq" in lines[-1]
    off = GreenTrainerCallback(rho=0.7, energy=False, log=lambda *a: None)
    tiny_trainer(make_tiny("llama"), tmp_path, 8, [off]).train()
    assert "energy_kwh" not in off.report and off.report["flops_fraction_of_full"] <= 0.7
    with pytest.raises(UsageError):
        GreenTrainerCallback(carbon_intensity="nowhere")


def test_max_steps_runs_the_first_n_steps_of_the_longer_run_with_its_own_schedule(monkeypatch):
    """--max-steps N: the first N optimizer steps of the run --epochs would make, in its data order, with the
    learning-rate schedule spanning N (full fine-tuning at another run's FLOPs, for a fair comparison)."""
    import greentrainer.loop as loop
    seen = []
    real = loop.reference_step_flops

    def record(meta, batch, gc, cache):
        seen.append(batch["input_ids"].clone())
        return real(meta, batch, gc, cache)
    monkeypatch.setattr(loop, "reference_step_flops", record)
    runs = {}
    for max_steps in (None, 6):
        seen.clear()
        cfg = TrainConfig(method="full", epochs=3, batch_size=4, lr=1e-3, seed=0, max_steps=max_steps)
        out = train(make_tiny("llama"), TOK, build_method(cfg), encoded(make_tiny("llama")), [], cfg,
                    torch.device("cpu"), log=lambda *a: None, progress=False)
        runs[max_steps] = (out, list(seen))
    long, cut = runs[None], runs[6]
    assert long[0]["totals"]["steps"] == 12 and cut[0]["totals"]["steps"] == 6
    assert [h["steps"] for h in cut[0]["history"]] == [4, 2]
    assert len(cut[1]) == 6 and all(torch.equal(a, b) for a, b in zip(cut[1], long[1][:6]))
    with pytest.raises(UsageError, match="max-steps"):
        TrainConfig(method="full", max_steps=0).validate()
