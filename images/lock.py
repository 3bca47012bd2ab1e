"""Write the images' dependency locks: every runtime dependency of hpa-kfp pinned.

    python images/lock.py                        # after `pip install -e .` in the environment the tests pass in
    python images/lock.py --python-version 3.12  # add or refresh the lock for a base with another Python

images/requirements.txt is the closure installed here (Python 3.11), read from the installed
distributions. A base image with another Python (the Ubuntu 24.04 PyTorch images have 3.12) gets
images/requirements-py<X.Y>.txt: the same pins, resolved by pip for that Python with wheels only
(`pip install --dry-run --report --python-version X.Y --only-binary=:all:`, nothing installed), so a pin
that has no wheel there fails here and not in a build. Without --python-version the existing
requirements-py*.txt are refreshed too.

The walk stops at CUDA wheels (nvidia-*, cuda-*, triton): the CPU image takes torch from the PyTorch
CPU index and the CUDA image from its base, so neither should get them from these lists.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

SKIP = re.compile(r"^(nvidia-|cuda-|triton$)")
HERE = Path(__file__).resolve().parent
MAIN = HERE / "requirements.txt"
KAGGLE = HERE / "requirements-kaggle.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str) -> dict[str, str]:
    pinned, todo = {}, [Requirement(r) for r in distribution(root).requires or [] if "extra ==" not in r]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in pinned or SKIP.match(name) or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name} is required but not installed here; pip install -e . first")
        pinned[name] = dist.version
        todo += [Requirement(r) for r in dist.requires or [] if "extra ==" not in r]
    return pinned


def read_pins(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def pip_report(args: list[str], what: str) -> list[dict]:
    """`pip install --dry-run --report` (nothing installed): the distributions pip would pick."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), *args]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = [line for line in result.stderr.splitlines() if line.startswith("ERROR")][:2]
            raise SystemExit(f"pip cannot resolve {what}: {' '.join(last) or result.stderr.strip()[-300:]}")
        return json.loads(report.read_text())["install"]


def pure_wheels_for_sdists(wheelhouse: Path) -> None:
    """Pins published only as source (kfp-server-api): build their wheels here, they must be pure Python.

    pip refuses source distributions when it resolves for another Python (--python-version), so the
    resolution below finds these wheels in `wheelhouse` instead.
    """
    picked = pip_report(["--no-deps", "-r", str(MAIN), "-r", str(KAGGLE)], "requirements.txt for this Python")
    sdists = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in picked
              if not i["download_info"]["url"].endswith(".whl")]
    if sdists:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheelhouse), *sdists],
                       check=True)
    compiled = [w.name for w in wheelhouse.glob("*.whl") if not w.name.endswith("-py3-none-any.whl")]
    if compiled:
        raise SystemExit(f"{', '.join(compiled)}: only a source distribution, and not pure Python; "
                         "it cannot be locked for another Python from here")


def resolve(python_version: str, requirements: list[str], constraints: list[Path], wheelhouse: Path) -> dict[str, str]:
    """What pip would install for `python_version` (wheels for this platform), without installing."""
    items = pip_report(["--target", str(wheelhouse / "target"),  # pip wants --target with --python-version
                        "--python-version", python_version, "--only-binary=:all:", "--find-links", str(wheelhouse),
                        *[a for c in constraints for a in ("-c", str(c))], *requirements],
                       f"the pins for Python {python_version}")
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def cross_lock(python_version: str) -> Path:
    """requirements-py<X.Y>.txt: requirements.txt's pins for another Python, checked with the kaggle extra."""
    if not re.fullmatch(r"3\.\d+", python_version):
        raise SystemExit(f"--python-version: expected 3.N, got {python_version!r}")
    runtime = [r for r in distribution("hpa-kfp").requires or [] if "extra ==" not in r]
    out = HERE / f"requirements-py{python_version}.txt"
    header = (f"# Generated by `python images/lock.py --python-version {python_version}`: "
              "the pins of requirements.txt\n"
              f"# resolved by pip for Python {python_version} (wheels only). Do not edit.\n")
    with tempfile.TemporaryDirectory() as tmp:
        wheelhouse = Path(tmp)
        pure_wheels_for_sdists(wheelhouse)
        pins = {n: v for n, v in resolve(python_version, runtime, [MAIN], wheelhouse).items() if not SKIP.match(n)}
        out.write_text(header + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
        # The images install requirements-kaggle.txt on top: it must resolve against this lock as well.
        resolve(python_version, ["-r", str(out), "-r", str(KAGGLE)], [out, KAGGLE], wheelhouse)
    extra = sorted(set(pins) - set(read_pins(MAIN)))  # -c requirements.txt: every shared pin is the same
    print(f"{out}: {len(pins)} pins" + (f", only on {python_version}: {', '.join(extra)}" if extra else ""))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python images/lock.py", description=__doc__.split("\n")[0])
    parser.add_argument("--python-version", help="write requirements-py<X.Y>.txt for a base with this Python")
    args = parser.parse_args()
    if args.python_version is None:
        pins = closure("hpa-kfp")
        header = "# Generated by `python images/lock.py` from the environment the tests pass in. Do not edit.\n"
        MAIN.write_text(header + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
        print(f"{MAIN}: {len(pins)} pins")
    versions = [args.python_version] if args.python_version else \
        sorted(p.name[len("requirements-py"):-len(".txt")] for p in HERE.glob("requirements-py*.txt"))
    for version in versions:
        cross_lock(version)
