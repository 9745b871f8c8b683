"""scripts/check_headline.py: issue 13's checks read from a summary, a missing input never met."""

from conftest import load_script


def _methods(n, **f1):
    out = {m: {"n": n, "f1": 0.1, "latency_s_mean": 1.0} for m in load_script("check_headline").METHODS}
    for m, v in f1.items():
        out[m]["f1"] = v
    out["rag"]["latency_s_mean"] = 2.0
    return out


def test_met_and_missed_checks_carry_their_numbers():
    mod = load_script("check_headline")
    ok = mod.check_summary({"datasets": {"hotpotqa": _methods(300, dmoe=0.2)}})
    assert ok["all_met"] and ok["datasets"]["hotpotqa"]["dmoe_ge_base"] == {
        "metric": "f1", "met": True, "dmoe": 0.2, "other": 0.1}

    short = _methods(299, dmoe=0.05)
    short["dmoe"]["latency_s_mean"] = 3.0
    got = mod.check_summary({"datasets": {"squad": short}})["datasets"]["squad"]
    assert not got["n"]["met"] and got["n"]["min"] == 299
    assert got["dmoe_ge_sft_lora"]["met"] is False
    assert got["latency_le_rag"] == {"met": False, "dmoe": 3.0, "other": 2.0}


def test_knowledge_conflicts_uses_efficacy_locality_and_double_n():
    mod = load_script("check_headline")
    methods = {m: {"n": 600, "efficacy": 0.1, "locality": 0.5, "latency_s_mean": 1.0}
               for m in mod.METHODS}
    methods["dmoe"].update(efficacy=0.17, locality=0.93)
    methods["rag"].update(efficacy=0.15, latency_s_mean=3.0)
    got = mod.check_summary({"datasets": {"knowledge_conflicts": methods}})
    assert got["all_met"], got
    methods["dmoe"]["locality"] = 0.89
    methods["base"]["n"] = 300
    got = mod.check_summary({"datasets": {"knowledge_conflicts": methods}})["datasets"]
    assert got["knowledge_conflicts"]["dmoe_locality"]["met"] is False
    assert got["knowledge_conflicts"]["n"] == {
        "met": False, "need": 600, "min": 300, "per_method": {m: 300 if m == "base" else 600 for m in mod.METHODS}}


def test_a_method_not_run_is_never_met():
    mod = load_script("check_headline")
    methods = _methods(300, dmoe=0.2)
    del methods["poly_prag"]
    got = mod.check_summary({"datasets": {"cwq": methods}})
    assert got["datasets"]["cwq"]["dmoe_ge_poly_prag"]["met"] is None
    assert got["datasets"]["cwq"]["n"]["met"] is False
    assert not got["all_met"]
