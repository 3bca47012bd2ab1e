"""No secret value in anything we ship or leave behind, and the images run as non-root.

- The compiled pipeline, every component YAML, the Katib / Trainer manifests and the Dockerfiles hold
  no credential: scanned for common key patterns, and credentials reach pods only as
  `secretKeyRef`s to Kubernetes secrets.
- A local run with the embedded S3 server (download -> montage -> split through kfp.local, keys only in
  the environment, as a pod gets them from the secret), with the pipeline compiled while those keys are
  set: the server's access and secret keys appear in no compiled YAML, no artifact, no executor output,
  and not in the run's captured output.
"""

import os
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHIPPED = sorted([*ROOT.glob("compiled/*.yaml"), *ROOT.glob("components/*/component.yaml"),
                  *ROOT.glob("katib/**/*.yaml"), *ROOT.glob("images/Dockerfile*")])
PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "KFP's default MinIO secret": re.compile(r"minio123"),
    "inline secret value": re.compile(
        r"(?i)\b(secret_?key|access_?key|password|kaggle_key|aws_secret_access_key)\b\s*[:=]\s*['\"]?[A-Za-z0-9/+=_-]{12,}"),
    "Kaggle API key": re.compile(r"\b[0-9a-f]{32}\b"),
}


def scan(text: str) -> list[str]:
    return [name for name, pattern in PATTERNS.items() if pattern.search(text)]


def test_shipped_files_hold_no_secret_pattern():
    assert any(p.name == "hpa_pipeline.yaml" for p in SHIPPED)
    found = {str(p.relative_to(ROOT)): scan(p.read_text()) for p in SHIPPED}
    assert not {k: v for k, v in found.items() if v}, found


def test_credentials_come_only_from_secret_refs():
    docs = list(yaml.safe_load_all((ROOT / "compiled" / "hpa_pipeline.yaml").read_text()))
    spec, platform = docs
    env_names = set()
    for executor in spec["deploymentSpec"]["executors"].values():
        env_names |= {e["name"] for e in executor.get("container", {}).get("env", [])}  # an importer has none
        assert not any("KEY" in name or "SECRET" in name for name in env_names), env_names
    for name, executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        for secret in executor.get("secretAsEnv", []):
            assert set(secret) <= {"keyToEnv", "optional", "secretName", "secretNameParameter"}, name
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert not [p for p in params if re.search(r"(?i)key|secret|password|token", p)], "no credential parameters"


def test_images_run_as_non_root_and_bake_in_no_secret():
    for dockerfile in sorted(ROOT.glob("images/Dockerfile*")):
        lines = [line.strip() for line in dockerfile.read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
        users = [line.split(None, 1)[1] for line in lines if line.upper().startswith("USER ")]
        assert users, f"{dockerfile.name}: no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{dockerfile.name}: final USER {users[-1]} must be a non-root uid"
        for line in lines:
            if line.upper().startswith(("ENV ", "ARG ")):
                assert not re.search(r"(?i)key|secret|password|token", line), f"{dockerfile.name}: {line}"
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored, ".dockerignore must exclude everything not named (no .env, kubeconfig, runs)"


@pytest.mark.slow
def test_local_run_leaves_no_key_anywhere(tmp_path, capfd, monkeypatch):
    import kfp.local
    from kfp import compiler, dsl

    from components.download.component import download
    from components.montage.component import montage
    from components.split.component import split
    from hpa.s3server import LocalS3Server

    with LocalS3Server(tmp_path / "s3") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        secrets = [server.access_key, server.secret_key]

        @dsl.pipeline(name="secrets-scan")
        def data_stages(store_uri: str):
            data = download(source="synthetic", store_uri=store_uri, n_train=30, n_test=10, image_size=32)
            montage(data_uri=data.outputs["data_uri"], n=4)
            split(data_uri=data.outputs["data_uri"], folds=3)

        compiler.Compiler().compile(data_stages, str(tmp_path / "compiled.yaml"))
        import pipeline

        written = pipeline.compile_all(tmp_path / "recompiled")  # the real pipeline, keys in the env
        kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
        data_stages(store_uri="s3://scan/hpa")

    captured = capfd.readouterr()
    files = [tmp_path / "compiled.yaml", *written, *(p for p in (tmp_path / "root").rglob("*") if p.is_file())]
    assert len(files) > 10
    leaks = [str(p) for p in files for s in secrets if s.encode() in p.read_bytes()]
    leaks += [f"captured {stream}" for stream in ("out", "err") for s in secrets if s in getattr(captured, stream)]
    assert not leaks, f"S3 keys leaked into: {leaks}"
    assert "SUCCESS" in captured.out + captured.err
    assert os.environ["HPA_S3_SECRET_KEY"] == server.secret_key  # the run really had the keys
