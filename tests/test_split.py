import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpa.errors import ConfigError, DataError
from hpa.labels import HPA_CLASS_COUNTS, HPA_N_IMAGES, format_target
from hpa.split import fold_counts, main, make_split, plot_fold_distribution, split_dataset, worst_deviation
from hpa.synthetic import sample_labels


def label_table(n: int, seed: int = 0) -> pd.DataFrame:
    labels = sample_labels(n, np.random.default_rng(seed))
    ids = [f"{i:08x}-id" for i in np.random.default_rng(seed + 1).permutation(n)]
    return pd.DataFrame({"Id": ids, "Target": [format_target(x) for x in labels], "labels": labels})


@pytest.fixture(scope="module")
def real_table():
    table = label_table(HPA_N_IMAGES)
    counts = np.bincount(np.concatenate(table["labels"].to_numpy()), minlength=28)
    assert counts.tolist() == HPA_CLASS_COUNTS.tolist()  # exactly the real HPA class counts
    return table


def test_real_hpa_distribution_split_is_fast_and_balanced(real_table):
    wall, cpu = time.perf_counter(), time.process_time()
    split = make_split(real_table, folds=5, seed=0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    quality = worst_deviation(split)
    counts = fold_counts(split)
    ideal = counts.sum(0) / 5
    print(f"\nsplit of {len(split)} rows (real HPA distribution) into 5 folds: {cpu:.2f} s CPU ({wall:.2f} s wall); "
          f"worst class deviation {quality['samples']:.1f} images = {quality['of_tolerance']:.2f} of the tolerance "
          f"max(2 % of ideal, 2); fold sizes {np.bincount(split['fold']).tolist()}; "
          f"largest class {counts[:, 0].tolist()} vs ideal {ideal[0]:.1f}; "
          f"rarest class {counts[:, 27].tolist()} vs ideal {ideal[27]:.1f}")
    assert cpu < 60
    assert quality["within_tolerance"]
    assert (np.abs(counts - ideal) <= np.maximum(0.02 * ideal, 2)).all()
    assert np.abs(np.bincount(split["fold"]) - len(split) / 5).max() <= 0.02 * len(split) / 5


def test_split_is_deterministic_per_seed_and_order_free():
    table = label_table(2000, seed=3)
    a = make_split(table, 5, seed=0)
    assert a.equals(make_split(table, 5, seed=0))
    assert not a["fold"].equals(make_split(table, 5, seed=1)["fold"])
    shuffled = make_split(table.sample(frac=1.0, random_state=7), 5, seed=0)
    assert shuffled.set_index("Id")["fold"].sort_index().equals(a.set_index("Id")["fold"].sort_index())
    assert list(a.columns) == ["Id", "Target", "fold"] and list(a["Id"]) == list(table["Id"])


def test_classes_rarer_than_folds_do_not_crash():
    table = pd.DataFrame({"Id": ["a", "b", "c", "d", "e", "f"], "Target": ["27", "0", "0 15", "0", "1", "0 1"]})
    table["labels"] = [[int(t) for t in s.split()] for s in table["Target"]]
    split = make_split(table, folds=5, seed=0)
    assert sorted(set(split["fold"])) == [0, 1, 2, 3, 4]
    counts = fold_counts(split)
    assert counts[:, 27].sum() == 1 and counts[:, 15].sum() == 1


def test_bad_fold_counts():
    table = label_table(10)
    with pytest.raises(ConfigError, match="folds must be an integer >= 2"):
        make_split(table, folds=1)
    with pytest.raises(DataError, match="10 images cannot fill 11 folds"):
        make_split(table, folds=11)


def test_plot_fold_distribution(tmp_path):
    split = make_split(label_table(500), 5, 0)
    path = plot_fold_distribution(split, tmp_path / "folds.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 600
        assert np.asarray(im.convert("L")).std() > 10  # not blank


def test_cli_local_paths(tmp_path, capsys):
    table = label_table(300)
    table[["Id", "Target"]].to_csv(tmp_path / "train.csv", index=False)
    rc = main(["--labels", str(tmp_path / "train.csv"), "--folds", "3", "--seed", "0",
               "--out", str(tmp_path / "out" / "split.csv"), "--plot", str(tmp_path / "fold_distribution.png")])
    assert rc == 0 and "300 images in 3 folds" in capsys.readouterr().out
    out = pd.read_csv(tmp_path / "out" / "split.csv", dtype={"Id": str, "Target": str})
    assert list(out.columns) == ["Id", "Target", "fold"] and sorted(set(out["fold"])) == [0, 1, 2]
    assert (tmp_path / "fold_distribution.png").stat().st_size > 1000


def test_split_dataset_on_s3(s3_bucket, tmp_path):
    from hpa.store import read_bytes, write_bytes

    table = label_table(200)
    data_uri = s3_bucket + "datasets/d1"
    write_bytes(data_uri + "/train.csv", table[["Id", "Target"]].to_csv(index=False).encode())
    summary = split_dataset(data_uri, folds=4, seed=2, out=s3_bucket + "splits/split.csv",
                            plot=s3_bucket + "splits/folds.png")
    assert summary["rows"] == 200 and summary["worst_deviation_within_tolerance"]
    text = read_bytes(s3_bucket + "splits/split.csv").decode()
    assert text.startswith("Id,Target,fold\n") and text.count("\n") == 201
    assert read_bytes(s3_bucket + "splits/folds.png")[:8] == b"\x89PNG\r\n\x1a\n"
    local = make_split(table, folds=4, seed=2)
    assert text == local.to_csv(index=False, lineterminator="\n")
