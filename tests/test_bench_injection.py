"""The injection bench's scoring helpers and settings (the bench itself needs the real model)."""

import pytest

from dmoe.baselines.protocol import MethodConfig
from dmoe.bench.injection import InjectionSetting, contains, has_loop, same_answer
from dmoe.training.build import BuildConfig


def test_has_loop_counts_a_repeated_trigram():
    assert has_loop("and and and and and")
    assert has_loop("Tallow-Tallow is a and Tallow-Tallow is a and Tallow-Tallow is a")
    assert not has_loop("The thermal loom was invented by Helena Marsk in 1891.")
    assert not has_loop("")


def test_scoring_uses_the_evals_answer():
    # first line, first sentence: a fact stated only after the first sentence does not count
    assert contains("Akshay Kumar plays him.", ["Akshay Kumar"])
    assert not contains("Jeffrey Dean Morgan. Akshay Kumar", ["Akshay Kumar"])
    assert same_answer("Paris.\nmore", "paris")


def test_settings_default_to_the_shipped_configs_and_parse_overrides():
    s = InjectionSetting()
    assert s.recipe == BuildConfig.recipe and s.top_k == MethodConfig.dmoe_top_k
    assert s.min_relevance == MethodConfig.route_min_relevance
    t = s.with_overrides("recipe=prag,lr=1e-3,route_at_start=0,composition_scale=0.5")
    assert (t.recipe, t.lr, t.route_at_start, t.composition_scale) == ("prag", 1e-3, False, 0.5)
    with pytest.raises(ValueError, match="nope"):
        s.with_overrides("nope=1")
    with pytest.raises(ValueError, match="recipe"):
        s.with_overrides("recipe=other")
