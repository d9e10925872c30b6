"""The checklist verifier: the score is the weighted fraction of checks passed, a broken check fails with its
reason instead of crashing, the ready-made checks decide what they say, and bad checklists are refused with
the offending check named."""

import math

import pytest

from ernie_jax.reward import (Check, Checklist, RewardSystem, contains, ends_with, matches, max_words,
                              no_repeated_line)


def test_weighted_fraction_and_passed_map():
    cl = Checklist([Check("short", lambda r: len(r) < 10, weight=1.0),
                    Check("has_x", lambda r: "x" in r, weight=3.0),
                    Check("upper", lambda r: r.isupper(), weight=0.5)])
    r = cl.score("xyz")  # short and has_x pass, upper fails
    assert r.passed == {"short": True, "has_x": True, "upper": False}
    assert list(r.passed) == ["short", "has_x", "upper"]
    assert r.score == pytest.approx(4.0 / 4.5)
    assert r.errors == {}
    assert cl.score("ABCDEFGHIJKL").score == pytest.approx(0.5 / 4.5)
    assert cl.score("XX").score == pytest.approx(1.5 / 4.5)
    assert cl.score("x").score == pytest.approx(1.0 - 0.5 / 4.5)


def test_raising_or_non_bool_check_fails_with_reason():
    def boom(r):
        raise KeyError("missing")

    cl = Checklist([Check("ok", lambda r: True), Check("boom", boom, weight=2.0),
                    Check("none", lambda r: None), Check("int", lambda r: 1)])
    r = cl.score("anything")
    assert r.passed == {"ok": True, "boom": False, "none": False, "int": False}
    assert r.score == pytest.approx(1 / 5)
    assert r.errors["boom"].startswith("raised KeyError") and "missing" in r.errors["boom"]
    assert "not a bool" in r.errors["none"] and "not a bool" in r.errors["int"]
    assert set(r.errors) == {"boom", "none", "int"}


def test_ready_made_checks():
    assert max_words(3).fn("one two  three") and not max_words(3).fn("a b c d")
    assert max_words(0).fn("  ") and max_words(3).name == "max_words(3)"
    assert contains("46").fn("it is 46.") and not contains("46").fn("4 6")
    m = matches(r"^\d+$")
    assert m.fn("123") and not m.fn("12a")
    assert no_repeated_line().fn("a\nb\n\n\nc") and not no_repeated_line().fn("a\nb\n a \n")
    assert ends_with("Done.").fn("all good. Done.  \n") and not ends_with("Done.").fn("Done. ok")
    cl = Checklist([max_words(5, weight=2.0), contains("yes", name="says_yes"), ends_with(".")])
    assert cl.score("yes it is.").score == 1.0
    assert cl.score("no it is not").score == pytest.approx(2 / 4)


def test_validation_names_the_check():
    with pytest.raises(ValueError, match="at least one check"):
        Checklist([])
    with pytest.raises(ValueError, match="two checks named 'a'"):
        Checklist([Check("a", bool), Check("b", bool), Check("a", bool)])
    for w in (0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match=r"check 'heavy': weight must be a finite number > 0"):
            Check("heavy", bool, weight=w)
    with pytest.raises(ValueError, match="check 'f': fn must be callable"):
        Check("f", "not callable")
    with pytest.raises(ValueError, match="Check.name"):
        Check("", bool)
    with pytest.raises(ValueError, match="Checklist check 1 must be a Check"):
        Checklist([Check("a", bool), lambda r: True])
    with pytest.raises(ValueError, match="regex '\\(' does not compile"):
        matches("(")
    with pytest.raises(ValueError, match="max_words: n must be an int >= 0, got -1"):
        max_words(-1)
    with pytest.raises(ValueError, match="response must be a str, got NoneType"):
        Checklist([Check("a", bool)]).score(None)


def test_as_source_reports_broken_checks():
    cl = Checklist([contains("a"), Check("broken", lambda r: 1 / 0)])
    batch = RewardSystem([cl.as_source(normalize=False)])([{}, {}], ["abc", "xyz"])
    assert batch.raw["checklist"].tolist() == [0.5, 0.0]
    assert batch.reasons["checklist"] == {"check broken raised ZeroDivisionError": 2}
    assert not batch.failures["checklist"]
