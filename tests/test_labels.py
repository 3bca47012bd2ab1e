import numpy as np
import pytest

from hpa.errors import DataError
from hpa.labels import (HPA_CLASS_COUNTS, HPA_LABELS_PER_IMAGE, HPA_N_IMAGES, NUM_CLASSES, format_target, parse_target,
                        to_matrix)


def test_real_statistics_are_consistent():
    assert NUM_CLASSES == 28 == len(HPA_CLASS_COUNTS)
    assert sum(HPA_LABELS_PER_IMAGE.values()) == HPA_N_IMAGES
    # total label count equals sum over images of labels per image
    assert HPA_CLASS_COUNTS.sum() == sum(k * v for k, v in HPA_LABELS_PER_IMAGE.items())


def test_parse_and_format_round_trip():
    assert parse_target("25 0 3", "x") == [0, 3, 25]
    assert format_target([25, 0, 3]) == "0 3 25"
    assert to_matrix([[0, 27]]).tolist()[0] == [1] + [0] * 26 + [1]


@pytest.mark.parametrize("text,needle", [("", "empty Target"), ("28", "label 28 is outside 0..27"),
                                         ("-1", "label -1 is outside"), ("3 3", "label 3 is repeated"),
                                         ("a", "'a' is not an integer"), (np.nan, "empty Target")])
def test_bad_targets_name_the_problem(text, needle):
    with pytest.raises(DataError, match="train.csv row 2") as info:
        parse_target(text, "train.csv row 2")
    assert needle in str(info.value)
