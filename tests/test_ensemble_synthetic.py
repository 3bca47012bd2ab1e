"""On the synthetic benchmark: fitted thresholds beat 0.5, and the ensemble is at least as good as the
best single model, out-of-sample.

Two small models (resnet18, se_resnet18) are trained here with `hpa.train` on a fixed-seed synthetic set
(32 px, 2000 train images in 4 folds: 1500 train / 500 val, 6 epochs, no augmentation), then predicted on
the test set with `hpa.predict`, ensembled (mean) with `hpa.ensemble.ensemble` and submitted with
`hpa.submit`. Measured on 2 idle cores: 111 s wall, 178 s CPU; the wall time grows with the machine's load.

What is asserted, and on what data:
- fitted per-class thresholds > 0.5 for each model: val macro F1 on the validation fold, out-of-sample
  (each of 5 stratified parts scored with thresholds fitted on the other 4; hpa.crossfit).
- ensemble >= best single model: the same out-of-sample val macro F1, for the ensemble and for each
  model alike. The test-set scores (thresholds from val, applied to test) are printed for information,
  not asserted, because at this size they are noisy and the claim need not hold there.
- The numbers below this line were measured in-sample, before scores were cross-fitted (issue 12).
- The margin is small and needs enough validation data: in development runs with 1000 images (250 val)
  the mean ensemble scored 0.2147 against the best single model's 0.2151 (rank and weighted were
  above); with 2000 images (500 val, this test) it scored 0.2213 against 0.2164. Models this small are
  weak (val macro F1 ~0.2), which is why the ensemble's gain is modest.
"""

import json
import time

import pandas as pd
import pytest
import torch

torch.set_num_threads(2)

SIZE, N_TRAIN, N_TEST, EPOCHS, FOLDS, SEED = 32, 2000, 160, 6, 4, 0
TRAIN = dict(size=SIZE, epochs=EPOCHS, batch_size=32, lr=2e-3, warmup_epochs=0.5, augment=False, workers=0,
             threads=2, device="cpu", seed=SEED)


@pytest.mark.slow
def test_ensemble_on_synthetic_benchmark(tmp_path):
    train_mod = pytest.importorskip("hpa.train")
    from hpa.data import read_labels
    from hpa.ensemble import ensemble
    from hpa.evaluate import binarize, fit_thresholds, macro_f1
    from hpa.predictions import load_predictions
    from hpa.predict import predict
    from hpa.split import make_split
    from hpa.submit import make_submission
    from hpa.synthetic import generate

    t0, cpu0 = time.perf_counter(), time.process_time()
    data = tmp_path / "data"
    generate(data, n_train=N_TRAIN, n_test=N_TEST, size=SIZE, seed=SEED)
    make_split(read_labels(data / "train.csv"), folds=FOLDS, seed=SEED).to_csv(tmp_path / "split.csv", index=False)

    val_files, test_files, rows = [], [], []
    for arch in ("resnet18", "se_resnet18"):
        out = tmp_path / arch
        cfg = train_mod.TrainConfig(data=str(data), split=str(tmp_path / "split.csv"), out=str(out), fold=0,
                                    arch=arch, **TRAIN)
        train_mod.train(cfg)
        val = load_predictions(out / "val_predictions.npz")
        at05 = macro_f1(val.targets, val.probs >= 0.5)
        fitted = float(pd.read_json(out / "metrics.json", typ="series")["best_val_macro_f1"])  # out-of-sample
        predict(out / "best.pt", data, ids="test", tta=2, out=out / "test.npz", device="cpu")
        # the validation fold predicted as the test set (TTA 2): the ensemble refuses a no-TTA/TTA pair
        predict(out / "best.pt", data, ids="val", split_csv=tmp_path / "split.csv", fold=0, tta=2,
                out=out / "val.npz", device="cpu")
        val_files.append(str(out / "val.npz"))
        test_files.append(str(out / "test.npz"))
        rows.append((arch, at05, fitted))

    metrics = ensemble(val_files, test_files, method="mean", threshold_mode="fitted", out_dir=tmp_path / "ens")
    sub = make_submission(tmp_path / "ens" / "ensemble_test.npz", tmp_path / "ens" / "thresholds.json",
                          data / "sample_submission.csv", tmp_path / "submission.csv")
    single_test = {}
    for (arch, *_), vf, tf in zip(rows, val_files, test_files):
        v, t = load_predictions(vf), load_predictions(tf)
        single_test[arch] = macro_f1(t.targets, binarize(t.probs, fit_thresholds(v.probs, v.targets)))

    print(f"\nsynthetic benchmark ({N_TRAIN} train / {N_TEST} test, {SIZE}px, {EPOCHS} epochs, fold 0 = "
          f"{metrics['n_val']} val images): {time.perf_counter() - t0:.0f} s wall, "
          f"{time.process_time() - cpu0:.0f} s CPU")
    print(f"{'model':<14}{'val F1 @0.5':>12}{'val F1 fitted (out-of-sample)':>31}{'test F1 (val thr)':>19}")
    for arch, at05, fitted in rows:
        print(f"{arch:<14}{at05:>12.4f}{fitted:>31.4f}{single_test[arch]:>19.4f}")
    print(f"{'ensemble mean':<14}{metrics['val_macro_f1_at_05']:>12.4f}{metrics['val_macro_f1']:>31.4f}"
          f"{sub['test_macro_f1']:>19.4f}")
    print(json.dumps({"ensemble_val_fitted": metrics["val_macro_f1"], "best_single_val_fitted":
                      metrics["best_single_val_macro_f1"], "ensemble_test": sub["test_macro_f1"]}))

    for arch, at05, fitted in rows:
        assert fitted > at05, f"{arch}: fitted thresholds {fitted:.4f} should beat 0.5 ({at05:.4f})"
    assert metrics["val_macro_f1"] >= metrics["best_single_val_macro_f1"]
    assert sub["rows"] == N_TEST
