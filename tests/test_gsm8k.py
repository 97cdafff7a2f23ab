"""GSM8K final-number extraction and exact match against hand-written cases."""

import pytest

from lorpa.tasks.clm.gsm8k import exact_match, final_number, gsm8k_accuracy

REFERENCE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    "text, number",
    [
        (REFERENCE, "72"),                                       # the number after ####, not the last one before it
        ("#### 1,234", "1234"),                                  # thousands commas
        ("So she pays $18.00.\n#### $18.00", "18"),              # dollar sign, trailing .00
        ("The answer is: 18.0", "18"),                           # MetaMathQA style, no ####: the last number
        ("It takes 2.50 hours and 3 more, so 5.5.", "5.5"),      # sentence-final period is not a decimal point
        ("He has 10-4=6 left", "6"),                              # a minus between numbers is not a sign
        ("The temperature is -3 degrees", "-3"),                 # a real negative number
        ("#### -0", "0"),
        ("about 50% of 40 is 20%", "20"),                        # percent sign dropped
        ("#### 0.50", "0.5"),
        ("#### 007", "7"),
        ("#### 72 #### 73", "73"),                                # the last ####
        ("no digits here", None),
        ("#### twelve", None),                                   # #### with no number after it
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


def test_exact_match_and_accuracy():
    predictions = [
        "She sold 72 clips.",             # right, no ####
        "48 + 24 = 72\n#### 72.00",       # right, formatted differently
        "#### 71",                        # wrong
        "I am not sure.",                 # no number: wrong
    ]
    references = [REFERENCE] * 4
    assert [exact_match(p, r) for p, r in zip(predictions, references)] == [True, True, False, False]
    assert gsm8k_accuracy(predictions, references) == 0.5
    assert not exact_match("nothing", "no number either")  # two missing numbers are not a match


def test_accuracy_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        gsm8k_accuracy(["1", "2"], ["#### 1"])
