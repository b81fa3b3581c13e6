"""Evaluation: beam-search generation, ROUGE-1/2/L (rouge-score, stemmed), SQuAD-style exact match,
PIQA label accuracy and two-choice log-likelihood accuracy."""
from __future__ import annotations

import re
import string

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import PLAIN, PromptFormat, encode_example, encode_prompt, stop_token_ids

_ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """Mean per-example ROUGE F1 ×100 against the first reference and the best of all references."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_KEYS), use_stemmer=True)
    first = {k: [] for k in _ROUGE_KEYS}
    best = {k: [] for k in _ROUGE_KEYS}
    for pred, refs in zip(predictions, references):
        scores = [scorer.score(r, pred) for r in refs]
        for k in _ROUGE_KEYS:
            first[k].append(scores[0][k].fmeasure)
            best[k].append(max(s[k].fmeasure for s in scores))
    out = {}
    for k in _ROUGE_KEYS:
        out[f"{k}_first_ref"] = 100 * float(np.mean(first[k])) if predictions else 0.0
        out[f"{k}_best_ref"] = 100 * float(np.mean(best[k])) if predictions else 0.0
    return out


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """% of predictions equal (after normalisation) to any gold answer."""
    hits = [any(normalize_answer(p) == normalize_answer(r) for r in refs) for p, refs in zip(predictions, references)]
    return 100 * float(np.mean(hits)) if hits else 0.0


@torch.no_grad()
def generate(model, tok, examples, task: str, seq2seq: bool, max_input_length: int, max_new_tokens: int,
             num_beams: int = 4, batch_size: int = 8, device=None, progress=True,
             fmt: PromptFormat = PLAIN) -> list[str]:
    """Beam-search outputs for the examples' prompts (decoder-only prompts are left-padded)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = []
    prompt_len = max_input_length if seq2seq else max(8, max_input_length - max_new_tokens)
    prompts = [encode_prompt(e, tok, task, seq2seq, prompt_len, fmt) for e in examples]
    stops = stop_token_ids(tok, fmt)
    for i in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False):
        chunk = prompts[i: i + batch_size]
        n = max(len(p) for p in chunk)
        pad = tok.pad_token_id
        if seq2seq:
            ids = [p + [pad] * (n - len(p)) for p in chunk]
            mask = [[1] * len(p) + [0] * (n - len(p)) for p in chunk]
        else:
            ids = [[pad] * (n - len(p)) + p for p in chunk]
            mask = [[0] * (n - len(p)) + [1] * len(p) for p in chunk]
        ids = torch.tensor(ids, device=device)
        mask = torch.tensor(mask, device=device)
        gen = _generate(model, seq2seq, input_ids=ids, attention_mask=mask, num_beams=num_beams, do_sample=False,
                        max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                        early_stopping=True if num_beams > 1 else False)
        new = gen if seq2seq else gen[:, ids.shape[1]:]
        outs += [tok.decode(g, skip_special_tokens=True).strip() for g in new]
    model.train(was_training)
    return outs


def _generate(model, seq2seq: bool, input_ids, attention_mask, **kw):
    """``model.generate``; for a PEFT prefix-tuned model, its base model's generate with the prefix as a
    prefilled cache. peft's own route hands the prefix over as ``past_key_values`` beside the ``cache`` that
    transformers' generate now passes, and the model reads ``cache``: the prefix was silently ignored
    (peft 0.21.2 with transformers 5.24). In a decoder-only model, placeholder tokens stand for the prefix's
    positions (the prompt's positions start after it, as in training; generate feeds only the tokens the cache
    lacks); in an encoder-decoder, the prefix is the decoder's and its first input the start token."""
    import copy
    import inspect
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or cfg.peft_type != "PREFIX_TUNING":
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
    base, n, b = model.get_base_model(), cfg.num_virtual_tokens, input_ids.shape[0]
    cache = copy.deepcopy(model.get_prompt(batch_size=b * kw.get("num_beams", 1)))  # generate grows it in place
    kw["cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"] = cache
    if seq2seq:
        start = input_ids.new_full((b, 1), base.config.decoder_start_token_id)
        return base.generate(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start, **kw)
    ids = torch.cat([input_ids.new_full((b, n), kw["pad_token_id"]), input_ids], 1)
    mask = torch.cat([attention_mask.new_ones((b, n)), attention_mask], 1)
    return base.generate(input_ids=ids, attention_mask=mask, **kw)[:, n:]


@torch.no_grad()
def choice_loglik_accuracy(model, tok, examples, seq2seq: bool, max_input_length: int, device=None,
                           fmt: PromptFormat = PLAIN) -> float:
    """PIQA: % of items where the correct label has the higher log-likelihood of the two."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for ex in examples:
        lls = []
        for lab in (0, 1):
            alt = type(ex)(**{**ex.__dict__, "label": lab})
            enc = encode_example(alt, tok, "piqa", seq2seq, max_input_length, fmt=fmt)
            ids = torch.tensor([enc.input_ids], device=device)
            labels = torch.tensor([enc.labels], device=device)
            out = model(input_ids=ids, labels=labels)
            n = int((labels != -100).sum())
            lls.append(-float(out.loss) * n)
        correct += int(int(np.argmax(lls)) == int(ex.label))
    model.train(was_training)
    return 100 * correct / max(len(examples), 1)


@torch.no_grad()
def token_loss(model, tok, examples, max_input_length: int, batch_size: int = 8) -> float:
    """Mean loss per target token over the examples (plain text: every token)."""
    from .data import collate
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    enc = [encode_example(e, tok, "lm", False, max_input_length) for e in examples]
    for i in range(0, len(enc), batch_size):
        batch = {k: v.to(device) for k, v in collate(enc[i: i + batch_size], tok.pad_token_id, False).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def evaluate(model, tok, examples, task: str, seq2seq: bool, max_input_length: int, max_new_tokens: int,
             num_beams: int = 4, batch_size: int = 8, progress=True,
             fmt: PromptFormat = PLAIN) -> tuple[dict, list[dict]]:
    """Metrics for the task and the per-example predictions (plain text, task ``lm``: the loss and perplexity
    on the examples instead, nothing generated)."""
    if task == "lm":
        loss = token_loss(model, tok, examples, max_input_length, batch_size)
        return {"loss": loss, "perplexity": float(np.exp(loss))}, []
    preds = generate(model, tok, examples, task, seq2seq, max_input_length, max_new_tokens, num_beams,
                     batch_size, progress=progress, fmt=fmt)
    refs = [e.targets for e in examples]
    if task == "summarization":
        metrics = rouge_scores(preds, refs)
        metrics["note"] = ("*_first_ref: against the first reference only; *_best_ref: best over all "
                           f"references (max {max(len(r) for r in refs)} per item)")
    elif task == "qa":
        metrics = {"exact_match": exact_match(preds, refs)}
    else:
        labels = [str(e.label) for e in examples]
        metrics = {"label_accuracy": 100 * float(np.mean([normalize_answer(p) == lab for p, lab in zip(preds, labels)])),
                   "loglik_accuracy": choice_loglik_accuracy(model, tok, examples, seq2seq, max_input_length,
                                                             fmt=fmt)}
    records = [{"id": e.id, "prediction": p, "references": e.targets} for e, p in zip(examples, preds)]
    return metrics, records
