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
