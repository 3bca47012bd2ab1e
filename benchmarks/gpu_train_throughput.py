"""Training throughput on one GPU: bare step vs streaming shards vs a seed-style PNG loader, in one run.

    # the real benchmark (one H100/H200; results go to BENCHMARKS.md):
    python benchmarks/gpu_train_throughput.py --device cuda --size 512 --batch-size 128 --steps 50 --workers 12
    # the smoke test (tests/test_benchmarks.py; no GPU needed):
    python benchmarks/gpu_train_throughput.py --device cpu --size 64 --steps 3

For each architecture (resnet18 and se_resnet18 from hpa.models.create_model, 4 channels, 28 classes):

  (a) bare     the train step alone on uint8 batches already on the device: bf16 autocast (GPU),
               channels_last, torch.compile (GPU), AdamW, BCE — the ceiling for (b)
  (b) shards   the full loop as hpa.train runs it: ShardDataset streaming the packed shards through a
               local cache + DataLoader workers (pinned memory) -> device -> hpa.inputs.prepare, hpa.train.augment
               on the device -> the same compiled bf16 step
  (c) seed     a seed-style baseline: a Dataset that PIL-decodes the 4 channel PNGs of every sample every
               epoch, float32 tensors from the workers, fp32, no channels_last, no compile

Prints img/s for each and the ratios b/a (goal >= 0.9) and b/c (goal >= 4). On CPU (--device cpu) there
is no bf16 autocast and no compile; the numbers only show that the benchmark runs.
Data: `hpa.synthetic` at --size (--images distinct images, each stored under --copies ids so that
every loader worker gets >= 2 batches per epoch), committed to a local store, packed with
`hpa.pack.pack`. GPU defaults: batch 128, 10 warm-up + 50 timed steps, workers = cores - 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("gpu_train_throughput")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--archs", default="resnet18,se_resnet18")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 on GPU, 4 on CPU")
    p.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (compile); default 10 GPU, 1 CPU")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers; default: cores - 2 (max 16)")
    p.add_argument("--images", type=int, default=None, help="distinct synthetic images (default 64 GPU, 16 CPU)")
    p.add_argument("--copies", type=int, default=None,
                   help="each image stored under this many ids (default 8 GPU, 1 CPU): a 512-sample set "
                        "without generating 512 images at 512 px (~0.5 s each on one core)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile (auto: on GPU)")
    p.add_argument("--only", default="a,b,c", help="which measurements")
    p.add_argument("--workdir", help="keep generated data here (default: a temporary directory)")
    return p


# --- data ----------------------------------------------------------------------------------------

def make_data(workdir: str, n: int, copies: int, size: int) -> tuple[str, str]:
    """Synthetic PNG layout (committed local store) and its packed shards; reused when present."""
    from hpa import data, pack, store, synthetic

    src, raw, data_uri, shard_root = (os.path.join(workdir, d) for d in ("distinct", "png", "data", "shards"))
    if not os.path.exists(os.path.join(raw, "train.csv")):
        synthetic.generate(src, n, 0, size=size, seed=0)
        labels = data.read_labels(os.path.join(src, "train.csv"))
        os.makedirs(os.path.join(raw, "train"), exist_ok=True)
        rows = []
        for k in range(copies):
            for image_id, target in zip(labels["Id"], labels["Target"]):
                new_id = f"{image_id}-{k}" if copies > 1 else image_id
                for color in ("red", "green", "blue", "yellow"):
                    os.link(os.path.join(src, "train", f"{image_id}_{color}.png"),
                            os.path.join(raw, "train", f"{new_id}_{color}.png"))
                rows.append(f"{new_id},{target}")
        with open(os.path.join(raw, "train.csv"), "w") as f:
            f.write("Id,Target\n" + "\n".join(sorted(rows)) + "\n")
    st = store.open_store(data_uri)
    if not st.exists("manifest.json"):
        st.commit_manifest(st.upload_tree(raw), {"source": "synthetic"})
    pack.pack(data_uri, shard_root, size, samples_per_shard=64, workers=max(1, min(8, (os.cpu_count() or 2) - 1)))
    return data_uri, shard_root


class SeedPNGDataset(torch.utils.data.Dataset):
    """What a first Kaggle kernel does: open 4 PNGs with PIL per sample, stack, float32 in [0, 1]."""

    def __init__(self, root: str, ids: list[str], targets: np.ndarray):
        self.root, self.ids, self.targets = root, ids, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        from PIL import Image

        planes = [np.asarray(Image.open(os.path.join(self.root, "train", f"{self.ids[i]}_{c}.png")), dtype=np.float32)
                  for c in ("red", "green", "blue", "yellow")]
        return torch.from_numpy(np.stack(planes) / 255.0).float(), torch.from_numpy(self.targets[i])


def forever(make_loader, set_epoch=None):
    """Batches from a fresh DataLoader each epoch, endlessly."""
    epoch = 0
    while True:
        if set_epoch is not None:
            set_epoch(epoch)
        yield from make_loader()
        epoch += 1


# --- steps ---------------------------------------------------------------------------------------

class Step:
    """One optimizer step of `arch`, configured as the fast loop (bf16/channels_last/compile) or the seed one."""

    def __init__(self, arch: str, device: torch.device, fast: bool, compile_model: bool):
        from hpa.models import create_model

        self.device, self.fast = device, fast
        model = create_model(arch, in_chans=4, num_classes=28).to(device)
        if fast:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if (fast and compile_model) else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.autocast = fast and device.type == "cuda"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def timed(step_fn, batches, steps: int, warmup: int, device: torch.device, batch_size: int) -> float:
    """img/s over `steps` steps after `warmup` untimed ones."""
    it = iter(batches)
    for _ in range(warmup):
        step_fn(*next(it))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step_fn(*next(it))
    float(loss)                       # waits for the last step
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_arch(arch: str, args, device, data_uri: str, shard_root: str, ids, targets, compile_model: bool) -> dict:
    from hpa import train as hpa_train
    from hpa import inputs as hpa_inputs
    from hpa.shards import ShardDataset, ShardSet

    bs, rates = args.batch_size, {}
    aug_cfg = hpa_train.TrainConfig(data="-", size=args.size)
    gen = torch.Generator(device=device).manual_seed(0)
    loader_kw = dict(batch_size=bs, num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
                     persistent_workers=False, prefetch_factor=4 if args.workers else None)
    only = set(args.only.split(","))
    # (a) and (b) share one compiled model: same graph, compiled once
    step = Step(arch, device, fast=True, compile_model=compile_model) if only & {"a", "b"} else None
    if "a" in only:                                           # (a) bare step, data already on the device
        x = torch.randint(0, 256, (bs, 4, args.size, args.size), dtype=torch.uint8, device=device)
        y = (torch.rand(bs, 28, device=device) < 0.1).float()

        def bare(x, y):
            return step(hpa_inputs.prepare(x, aug_cfg.in_chans, aug_cfg.size), y)

        rates["a"] = timed(bare, iter(lambda: (x, y), None), args.steps, args.warmup, device, bs)
        del x, y
    if "b" in only:                                           # (b) streaming shards, full loop
        total = sum(s["size"] for s in ShardSet(shard_root).shards)
        ds = ShardDataset(shard_root, shuffle=True, seed=0, cache_dir=os.path.join(args.workdir, "cache"),
                          cache_bytes=max(total + (64 << 20), 512 << 20))   # the whole set, like a real run

        def full(x, y, _ids):
            x = hpa_inputs.prepare(x.to(device, non_blocking=True), aug_cfg.in_chans, aug_cfg.size)
            x = hpa_train.augment(x, gen, aug_cfg.min_crop)
            return step(x, y.to(device, non_blocking=True))

        batches = forever(lambda: torch.utils.data.DataLoader(ds, **loader_kw), ds.set_epoch)
        rates["b"] = timed(full, batches, args.steps, args.warmup, device, bs)
    del step
    if "c" in only:                                           # (c) seed-style loader, fp32
        step = Step(arch, device, fast=False, compile_model=False)
        png = SeedPNGDataset(os.path.join(args.workdir, "png"), ids, targets)

        def seed_step(x, y):
            return step(x.to(device), y.to(device))

        batches = forever(lambda: torch.utils.data.DataLoader(png, shuffle=True, **loader_kw))
        rates["c"] = timed(seed_step, batches, args.steps, args.warmup, device, bs)
        del step
    return rates


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (128 if gpu else 4)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.workers = args.workers if args.workers is not None else max(1, min(16, (os.cpu_count() or 2) - 2))
    args.images = args.images or (64 if gpu else 16)
    # Each DataLoader worker batches its own part of the stream (drop_last): every worker needs at least
    # a couple of full batches per epoch, or (b) would yield nothing.
    need = -(-2 * max(1, args.workers) * args.batch_size // args.images)
    args.copies = max(args.copies or 1, need)
    compile_model = args.compile == "on" or (args.compile == "auto" and gpu)
    if gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(1)      # CPU mode is a smoke test; on a shared machine 1 thread is fastest
    from hpa import data

    with tempfile.TemporaryDirectory(prefix="hpa-gpu-bench-") as tmp:
        args.workdir = args.workdir or tmp
        os.makedirs(args.workdir, exist_ok=True)
        data_uri, shard_root = make_data(args.workdir, args.images, args.copies, args.size)
        labels = data.read_labels(os.path.join(args.workdir, "png", "train.csv"))
        targets = data.targets_matrix(labels).astype(np.float32)
        name = torch.cuda.get_device_name(device) if gpu else "cpu"
        print(f"train throughput on {name}: {args.size} px, 4 channels, batch {args.batch_size}, {args.steps} steps "
              f"(+{args.warmup} warm-up), {args.workers} loader workers, {'bf16 autocast' if gpu else 'fp32'}, "
              f"compile {'on' if compile_model else 'off'}, torch {torch.__version__}")
        for arch in args.archs.split(","):
            r = run_arch(arch, args, device, data_uri, shard_root, list(labels["Id"]), targets, compile_model)
            names = {"a": "(a) bare step", "b": "(b) shards loop", "c": "(c) seed loader"}
            print(f"{arch}: " + " | ".join(f"{names[k]} {v:.1f} img/s" for k, v in r.items()))
            if "a" in r and "b" in r:
                print(f"{arch}: ratio b/a (shards loop / bare step): {r['b'] / r['a']:.2f} (goal >= 0.9)")
            if "b" in r and "c" in r:
                print(f"{arch}: ratio b/c (shards loop / seed loader): {r['b'] / r['c']:.2f} (goal >= 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
