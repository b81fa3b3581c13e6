import pytest

from greentrainer.evaluate import exact_match, normalize_answer, rouge_scores


def test_rouge_on_known_strings():
    r = rouge_scores(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert r["rouge1_first_ref"] == pytest.approx(100) and r["rougeL_best_ref"] == pytest.approx(100)
    r = rouge_scores(["the cat"], [["a dog barked", "the cat ran"]])
    # first reference shares nothing; the best reference shares "the cat": P=1, R=2/3
    assert r["rouge1_first_ref"] == pytest.approx(0)
    assert r["rouge1_best_ref"] == pytest.approx(100 * 0.8)
    assert r["rouge2_best_ref"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
    # stemming on: "running" matches "run"
    assert rouge_scores(["running"], [["run"]])["rouge1_first_ref"] == pytest.approx(100)


def test_exact_match_squad_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match(["the Jazmyn Bieber", "x"], [["Jazmyn Bieber", "Jaxon"], ["y"]]) == pytest.approx(50)


def test_qa_and_piqa_evaluation_on_a_tiny_model():
    from conftest import make_tiny
    from greentrainer.data import Example
    from greentrainer.evaluate import evaluate
    from greentrainer.models import tiny_tokenizer
    tok, model = tiny_tokenizer(), make_tiny("llama")
    qa = [Example("who wrote it?", "me", ["me", "I"]), Example("where?", "here", ["here"])]
    m, preds = evaluate(model, tok, qa, "qa", False, 64, 4, num_beams=2, progress=False)
    assert set(m) == {"exact_match"} and 0 <= m["exact_match"] <= 100 and len(preds) == 2
    piqa = [Example("open a jar", "twist", ["twist"], choices=["twist", "hit"], label=0),
            Example("dry hair", "towel", ["towel"], choices=["fire", "towel"], label=1)]
    m, _ = evaluate(model, tok, piqa, "piqa", False, 64, 4, num_beams=1, progress=False)
    assert set(m) == {"label_accuracy", "loglik_accuracy"}
    assert m["loglik_accuracy"] in (0.0, 50.0, 100.0)
