"""Security: Katib and Trainer manifests carry no secret value, only secretKeyRef references.

Three checks on the committed files (katib/experiment.yaml, manifests/*.yaml, the katib_tune and
train_distributed component YAMLs) and on fresh renders made while the environment holds canary
credentials: (1) no canary and no well-known default credential appears anywhere in the text;
(2) every env entry whose name looks like a credential reads it with valueFrom.secretKeyRef;
(3) the references point at the KFP MinIO secret's keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from hpa import config, katib, train_distributed

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = [ROOT / "katib" / "experiment.yaml", *sorted((ROOT / "manifests").glob("*.yaml")),
             ROOT / "components" / "katib_tune" / "component.yaml",
             ROOT / "components" / "train_distributed" / "component.yaml"]
CANARIES = {"HPA_S3_ACCESS_KEY": "canaryAccessKey7Q2", "HPA_S3_SECRET_KEY": "canarySecretKey9X4/+w",
            "AWS_ACCESS_KEY_ID": "canaryAwsId3K", "AWS_SECRET_ACCESS_KEY": "canaryAwsSecret8Z",
            "KAGGLE_USERNAME": "canaryKaggleUser", "KAGGLE_KEY": "canaryKaggleKey5M"}
DEFAULT_CREDENTIALS = ("minio123", "minioadmin", "AKIA")  # KFP's and MinIO's well-known defaults, AWS key ids
CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def _env_entries(node):
    """Every container env entry (dicts with a name and value/valueFrom) anywhere in a document."""
    if isinstance(node, dict):
        if "name" in node and ("value" in node or "valueFrom" in node) and isinstance(node.get("name"), str):
            yield node
        for child in node.values():
            yield from _env_entries(child)
    elif isinstance(node, list):
        for child in node:
            yield from _env_entries(child)


def _rendered(monkeypatch) -> dict[str, str]:
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    texts = {}
    for algorithm in ("tpe", "grid"):
        for kind in katib.TRIAL_KINDS:
            cfg = katib.KatibConfig(algorithm=algorithm, trial_kind=kind, max_trials=6, dataset="d")
            texts[f"katib-{algorithm}-{kind}"] = katib.render_yaml(cfg)
    for kind in train_distributed.KINDS:
        texts[f"distributed-{kind}"] = train_distributed.render_yaml(train_distributed.DistributedConfig(kind=kind,
                                                                                                         num_nodes=3))
    return texts


def _all_texts(monkeypatch) -> dict[str, str]:
    return {**{str(p.relative_to(ROOT)): p.read_text() for p in COMMITTED}, **_rendered(monkeypatch)}


def test_no_secret_value_in_any_manifest(monkeypatch):
    texts = _all_texts(monkeypatch)
    assert len(texts) == len(COMMITTED) + 6 and all(p.exists() for p in COMMITTED)
    for where, text in texts.items():
        for secret in (*CANARIES.values(), *DEFAULT_CREDENTIALS):
            assert secret not in text, f"{where} contains a secret value"
    print(f"scanned {len(texts)} manifests for {len(CANARIES) + len(DEFAULT_CREDENTIALS)} secret values: none found")


def test_credentials_come_only_from_secret_key_refs(monkeypatch):
    checked = 0
    for where, text in _all_texts(monkeypatch).items():
        if where.startswith("components/"):
            continue  # component YAMLs get their env from pipeline.py's platform spec (its own test)
        for doc in yaml.safe_load_all(text):
            entries = [e for e in _env_entries(doc) if CREDENTIAL_NAME.search(e["name"])]
            assert entries, f"{where}: expected the S3 credentials as env"
            for entry in entries:
                assert "value" not in entry, f"{where}: {entry['name']} has a literal value"
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] == config.S3_SECRET_NAME and config.S3_SECRET_KEYS[ref["key"]] == entry["name"]
                checked += 1
    assert checked >= 12



def _containers(node):
    """Container-like dicts: a name plus an image or volume mounts (a TrainJob's patch has no image)."""
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and ("image" in node or "volumeMounts" in node):
            yield node
        for child in node.values():
            yield from _containers(child)
    elif isinstance(node, list):
        for child in node:
            yield from _containers(child)


def test_every_container_refuses_root(monkeypatch):
    """The images run as uid 1000; every container in the manifests adds runAsNonRoot and no privilege escalation."""
    for where, text in _rendered(monkeypatch).items():
        containers = list(_containers(yaml.safe_load(text)))
        assert containers, where
        for container in containers:
            assert container.get("securityContext") == {"runAsNonRoot": True, "allowPrivilegeEscalation": False}, \
                f"{where}: container {container['name']}"
