"""report.py's paired differences, against values worked out by hand."""
import math

from report import paired_to_base, question_paired_difference


def test_paired_to_base_counts_fixed_and_broken_questions():
    # 4 questions: the tuned model solves 0, 1, 2; the base 2, 3 -> d_q = 1, 1, 0, -1
    res = {"solved": {"output": {"acc": [0, 1, 2]}, "base": {"acc": [2, 3]}},
           "metrics": {"output": {"acc": 75.0}, "base": {"acc": 50.0}}}
    [(metric, tuned, base, d, half, fixed, broken)] = paired_to_base(res, 4)
    sd = math.sqrt((0.75 ** 2 * 2 + 0.25 ** 2 + 1.25 ** 2) / 3)  # sample sd of 1, 1, 0, -1 around 0.25
    assert (metric, tuned, base, fixed, broken) == ("acc", 75.0, 50.0, 2, 1)
    assert math.isclose(d, 25.0) and math.isclose(half, 100 * 1.96 * sd / 2)


def test_question_paired_difference_averages_seeds_per_question():
    # seed 0: a solves {0}, reference {1}; seed 1: a solves {0, 1}, reference {1}
    d, half = question_paired_difference({0: [0], 1: [0, 1]}, {0: [1], 1: [1]}, [0, 1], 3)
    per_q = [1.0, -0.5, 0.0]  # q0: +1/2 +1/2; q1: -1/2 on seed 0, +1/2 -1/2 on seed 1; q2: nothing
    mean = sum(per_q) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_q) / 2)
    assert math.isclose(d, 100 * mean) and math.isclose(half, 100 * 1.96 * sd / math.sqrt(3))
