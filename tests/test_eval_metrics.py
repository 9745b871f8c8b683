"""Scoring against known SQuAD v1.1 evaluation-script cases, yes/no rules and answer extraction."""

import random

import pytest

from dmoe.engine.decode import stop_index
from dmoe.eval.metrics import (
    ANSWER_STOPS,
    accuracy,
    contains,
    exact_match,
    extract_answer,
    f1,
    normalize_answer,
    score,
    yes_no_label,
)


@pytest.mark.parametrize("raw,norm", [
    ("The Denver Broncos!", "denver broncos"),
    ("  an   Apple, a day ", "apple day"),
    ("Levi's Stadium", "levis stadium"),
    ("THE END.", "end"),
    ("theater", "theater"),  # "the" only as a whole word
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_squad_eval_cases():
    # Values computed with the official evaluate-v1.1.py logic.
    assert exact_match("Denver Broncos", ["Denver Broncos"]) == 1.0
    assert exact_match("the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert exact_match("Broncos", ["Denver Broncos"]) == 0.0
    assert f1("Broncos", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert f1("Santa Clara", ["Santa Clara, California", "Levi's Stadium"]) == pytest.approx(0.8)
    assert f1("Levi's Stadium in Santa Clara", ["Santa Clara, California", "Levi's Stadium"]) == \
        pytest.approx(2 * (2 / 5) * 1 / (2 / 5 + 1))  # max over aliases: Levi's Stadium, p=2/5 r=1
    assert f1("the the the", ["a"]) == 0.0  # both normalise to empty
    assert f1("cat cat dog", ["cat dog dog"]) == pytest.approx(2 / 3)  # bag-of-tokens counts


def test_max_over_aliases_and_bad_gold():
    assert exact_match("Brasil", ["Brazil", "Brasil"]) == 1.0
    with pytest.raises(ValueError):
        f1("x", [])


def test_yes_no_mismatch_gets_no_f1():
    assert f1("no", ["yes"]) == 0.0
    assert f1("yes it is", ["yes"]) == 0.0  # gold is a bare yes: only an exact yes counts
    assert f1("yes", ["Yes."]) == 1.0
    assert f1("no", ["no way"]) == 0.0  # prediction is a bare "no", gold differs


@pytest.mark.parametrize("text,label", [
    ("Yes, he did.", "yes"), ("no", "no"), ("False.", "no"), ("The answer is no.", "no"),
    ("I am not sure", None), ("maybe yes, maybe no", None),
])
def test_yes_no_label(text, label):
    assert yes_no_label(text) == label


def test_accuracy_and_score_kinds():
    assert accuracy("Yes, because ...", ["yes"]) == 1.0
    assert accuracy("maybe", ["no"]) == 0.0
    s = score("No, it cannot.\nMore text", ["no"], "yesno")
    assert s["acc"] == s["em"] == s["f1"] == 1.0 and s["answer"] == "No, it cannot."
    with pytest.raises(ValueError):
        score("x", ["y"], "choice")


@pytest.mark.parametrize("gen,answer", [
    ("\n  Denver Broncos\nThe end", "Denver Broncos"),
    ("Answer: Paris. It is the capital.", "Paris."),
    ("It cost 3.5 million dollars. Later it rose.", "It cost 3.5 million dollars."),
    ("", ""),
])
def test_extract_answer(gen, answer):
    assert extract_answer(gen) == answer


def test_contains_is_token_bounded():
    assert contains("The team was the Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert contains("Parisian", ["Paris"]) == 0.0
    s = score("The NFL team was the Broncos.", ["Denver Broncos", "Broncos"])
    assert s["contains"] == 1.0 and s["em"] == 0.0 and 0 < s["f1"] < 1


def test_span_sample_with_yes_no_gold_scores_the_label():
    s = score("No, the two mosques are not in the same city.", ["no"])
    assert s["em"] == s["f1"] == 1.0
    assert score("Yes, both are American.", ["no"])["f1"] == 0.0
    assert score("They are both American.", ["yes"])["f1"] == 0.0


def test_stopping_at_answer_stops_scores_like_the_full_generation():
    """The eval protocol stops a generation at the first of ``ANSWER_STOPS`` (after its leading
    whitespace, ``stop_index``): the cut text must score exactly as the full one, for every kind."""
    pieces = ["Paris", "the", "Denver Broncos", "no", "Yes", "3.5", "U.S.", "Mr.", "Answer:",
              "answer -", ".", "!", "?", ",", " ", " ", " ", "\n", "\t", "\u00a0", "\n\n"]
    golds = [["Paris"], ["Denver Broncos", "Broncos"], ["no"], ["yes"], ["3.5"]]
    rng = random.Random(0)
    cut_some = 0
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        at = stop_index(text, ANSWER_STOPS)
        if at is None:
            continue
        cut_some += 1
        for gold in golds:
            for kind in ("span", "yesno"):
                full, cut = score(text, gold, kind), score(text[:at], gold, kind)
                assert normalize_answer(str(full.pop("answer"))) == \
                    normalize_answer(str(cut.pop("answer"))), text
                assert full == cut, (text, gold, kind)
    assert cut_some > 1000
