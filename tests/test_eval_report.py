import math

from sae_ext.eval_report import fmt


def test_fmt_dashes_missing_values_and_applies_a_given_spec() -> None:
    assert fmt(None) == fmt(math.nan) == fmt(math.inf) == fmt(math.nan, ".3f") == "–"
    assert fmt(0.123456) == "0.1235" and fmt(0.123456, ".3f") == "0.123" and fmt(-0.5, "+.2f") == "-0.50"
    assert fmt(1234) == "1,234" and fmt(4, ".1f") == "4.0" and fmt(True, ".3f") == "True" and fmt("x", ".3f") == "x"
