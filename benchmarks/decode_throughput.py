"""Decode throughput per CPU core: packed shards vs the PNG layout, side by side in one run.

    python benchmarks/decode_throughput.py --n 64 --size 512            # the BENCHMARKS.md numbers
    python benchmarks/decode_throughput.py --n 4 --size 64 --repeat 1   # smoke test (tests/test_benchmarks.py)

Data: `hpa.synthetic.generate` at --size (PNG layout, 8-bit grayscale per channel), packed with
`hpa.pack.write_shards`. One process, one thread (torch.set_num_threads(1)), files in the page cache,
so this measures decode cost per core, not storage. Each format decodes every image to a uint8
(4, H, W) array, the way the training loaders do:

    png      hpa.data.load_image: PIL decode of the 4 channel PNGs (what PNGDataset does per sample)
    shards   hpa.shards.ShardDataset, one process: seek to the sample's offset, zstd decode, tensor
    raw      the same arrays stored uncompressed (the `.npy` alternative): read only, no decode
    webdataset / litdata (--formats, when installed): the same shards read by the webdataset library,
             and litdata's optimize()/StreamingDataset format (raw and zstd chunks)

Prints one line per format (img/s per CPU-second of this single-threaded process, ms per image, stored
KiB per image, wall-clock img/s) and `ratio shards/png: X.Yx` (goal >= 5x).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

log = logging.getLogger("decode_throughput")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=64, help="images")
    p.add_argument("--size", type=int, default=512, help="pixels (square)")
    p.add_argument("--repeat", type=int, default=3, help="passes per format; the best is reported")
    p.add_argument("--formats", default="png,shards,raw",
                   help="comma list of png, shards, raw, webdataset, litdata")
    p.add_argument("--workdir", help="keep the generated data here (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    return p


def best_rate(fn, n: int, repeat: int) -> tuple[float, float]:
    """(img/s per CPU second, img/s wall clock) of the fastest of `repeat` passes over all n images.

    CPU time (time.process_time, one thread) is the per-core cost even on a shared, busy machine;
    wall clock is printed next to it.
    """
    best_cpu = best_wall = float("inf")
    for _ in range(repeat):
        cpu, wall = time.process_time(), time.perf_counter()
        count = fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if count != n:
            raise RuntimeError(f"decoded {count} images, expected {n}")
        best_cpu, best_wall = min(best_cpu, cpu), min(best_wall, wall)
    return n / max(best_cpu, 1e-9), n / best_wall


def make_data(workdir: str, n: int, size: int, seed: int) -> dict:
    from hpa import data, pack, synthetic

    raw_dir = os.path.join(workdir, "png")
    if not os.path.exists(os.path.join(raw_dir, "train.csv")):
        synthetic.generate(raw_dir, n, 0, size=size, seed=seed)
    labels = data.read_labels(os.path.join(raw_dir, "train.csv"))
    ids = list(labels["Id"])
    images = [data.load_image(raw_dir, i) for i in ids]
    shard_dir = os.path.join(workdir, "shards")
    pack.write_shards(shard_dir, ((i, list(map(int, t)), im) for i, t, im in zip(ids, labels["labels"], images)),
                        samples_per_shard=max(1, n // 2))
    raw_path = os.path.join(workdir, "raw.bin")
    with open(raw_path, "wb") as f:
        for im in images:
            f.write(im.tobytes())
    png_dir = os.path.join(raw_dir, "train")
    png_bytes = sum(os.path.getsize(os.path.join(png_dir, name)) for name in os.listdir(png_dir))
    shard_bytes = sum(os.path.getsize(os.path.join(shard_dir, name)) for name in os.listdir(shard_dir)
                      if name.endswith(".tar"))
    return {"raw_dir": raw_dir, "ids": ids, "shard_dir": shard_dir, "raw_path": raw_path, "shape": images[0].shape,
            "images": images, "bytes": {"png": png_bytes, "shards": shard_bytes, "raw": os.path.getsize(raw_path)}}


def decode_png(d: dict) -> int:
    from hpa import data

    for i in d["ids"]:
        image = data.load_image(d["raw_dir"], i)
    assert image.dtype == np.uint8
    return len(d["ids"])


def decode_shards(dataset) -> int:
    return sum(1 for _ in dataset)


def decode_raw(d: dict) -> int:
    nbytes = int(np.prod(d["shape"]))
    count = 0
    with open(d["raw_path"], "rb") as f:
        for k in range(len(d["ids"])):
            f.seek(k * nbytes)
            torch.from_numpy(np.frombuffer(bytearray(f.read(nbytes)), np.uint8).reshape(d["shape"]))
            count += 1
    return count


def decode_webdataset(d: dict) -> int:
    import webdataset as wds
    import zstandard

    names = sorted(n for n in os.listdir(d["shard_dir"]) if n.endswith(".tar"))
    urls = [os.path.join(d["shard_dir"], n) for n in names]
    dctx = zstandard.ZstdDecompressor()
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        np.frombuffer(dctx.decompress(sample["rgby.zst"]), np.uint8).reshape(d["shape"])
        json.loads(sample["json"])
        count += 1
    return count


def make_litdata(d: dict, workdir: str, compression: str | None) -> str:
    import litdata

    out = os.path.join(workdir, f"litdata-{compression or 'raw'}")
    if not os.path.exists(os.path.join(out, "index.json")):
        images = d["images"]
        litdata.optimize(fn=_litdata_item, inputs=[(k, images[k]) for k in range(len(images))], output_dir=out,
                         chunk_bytes="64MB", num_workers=1, compression=compression, mode="overwrite")
    return out


def _litdata_item(item):
    k, image = item
    return {"index": k, "image": image}


def decode_litdata(path: str, n: int) -> int:
    import litdata

    count = 0
    for sample in litdata.StreamingDataset(path):
        assert sample["image"].dtype == np.uint8
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    with tempfile.TemporaryDirectory(prefix="hpa-decode-bench-") as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        d = make_data(workdir, args.n, args.size, args.seed)
        print(f"decode throughput, one core: {args.n} images of {d['shape']} uint8 "
              f"(python {platform.python_version()}, torch {torch.__version__})")
        rates: dict[str, tuple[float, float]] = {}
        sizes = dict(d["bytes"])
        for name in formats:
            if name == "png":
                rates[name] = best_rate(lambda: decode_png(d), args.n, args.repeat)
            elif name == "shards":
                from hpa.shards import ShardDataset

                dataset = ShardDataset(d["shard_dir"], shuffle=False, cache_dir=os.path.join(workdir, "cache"))
                decode_shards(dataset)      # first pass fills the local shard cache, like epoch 1
                rates[name] = best_rate(lambda: decode_shards(dataset), args.n, args.repeat)
            elif name == "raw":
                rates[name] = best_rate(lambda: decode_raw(d), args.n, args.repeat)
            elif name == "webdataset":
                sizes[name] = sizes["shards"]
                rates[name] = best_rate(lambda: decode_webdataset(d), args.n, args.repeat)
            elif name == "litdata":
                for comp in (None, "zstd"):
                    path = make_litdata(d, workdir, comp)
                    key = f"litdata-{comp or 'raw'}"
                    sizes[key] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                    rates[key] = best_rate(lambda: decode_litdata(path, args.n), args.n, args.repeat)
            else:
                raise SystemExit(f"error: unknown format {name!r}")
        for name, (rate, wall) in rates.items():
            print(f"{name:<14} {rate:9.1f} img/s per core  {1000 / rate:8.2f} ms/img  "
                  f"{sizes[name] / args.n / 1024:8.1f} KiB/img  (wall clock {wall:.1f} img/s)")
        if "png" in rates and "shards" in rates:
            print(f"ratio shards/png: {rates['shards'][0] / rates['png'][0]:.1f}x (goal >= 5x; wall clock "
                  f"{rates['shards'][1] / rates['png'][1]:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
