"""Hostile archives and source files (issue 13, items 4, 5 and 8): redirects that downgrade to plain http,
compression bombs (ratio, per-file cap, lying headers), nested archives sharing one budget, corrupt
archives, CSV dialects, and error lines that name the user's file or URL instead of a deleted temporary path.

Everything is real: archives are built here with zipfile/tarfile/gzip and byte surgery, served by a
loopback HTTP(S) server; the TLS certificate is made here and trusted through SSL_CERT_FILE.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import gzip
import http.server
import io
import ipaddress
import shutil
import ssl
import struct
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpa import download as dl
from hpa.archives import extract_archive
from hpa.cli import main as cli_main
from hpa.data import read_labels, read_sample_submission
from hpa.errors import DataError

MB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Loopback servers


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@contextlib.contextmanager
def serve(directory: Path, redirects: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None):
    """Serve `directory` on 127.0.0.1 (https with `tls`); GET of a path in `redirects` answers 302 there."""
    moved = redirects or {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] in moved:
                self.send_response(302)
                self.send_header("Location", moved[self.path.split("?")[0]])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    server.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tls(tmp_path_factory, monkeypatch):
    """A certificate for a loopback https server, trusted by urllib in this test (SSL_CERT_FILE)."""
    pair = make_certificate(tmp_path_factory.mktemp("tls"))
    monkeypatch.setenv("SSL_CERT_FILE", str(pair[0]))
    return pair


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory):
    from hpa.synthetic import generate

    root = tmp_path_factory.mktemp("kaggle")
    generate(root, 8, 4, size=16, seed=7)
    return root


# ---------------------------------------------------------------------------------------------
# Archive builders


def zip_bytes(files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def layout_files(root: Path, prefix: str = "hpa/") -> dict[str, bytes]:
    return {prefix + p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lying_zip(real: int = 5 * MB, declared: int = 1000) -> bytes:
    """One deflated member of `real` zero bytes whose headers (local and central) declare `declared`."""
    data = bytearray(zip_bytes({"hpa/big.bin": b"\0" * real}))
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, declared)  # central directory: uncompressed size
    struct.pack_into("<I", data, 22, declared)  # local header: uncompressed size
    return bytes(data)


def crc_error_zip(kaggle_dir: Path) -> bytes:
    """A stored (uncompressed) member with one flipped data byte: only the CRC can tell."""
    data = bytearray(zip_bytes(layout_files(kaggle_dir), compression=zipfile.ZIP_STORED))
    at = data.find(b"IDAT")
    data[at + 8] ^= 0xFF
    return bytes(data)


def low_entropy(n: int, seed: int = 0) -> bytes:
    """Bytes that deflate about 3-4 times: no bomb, but more unpacked than packed."""
    return np.random.default_rng(seed).integers(0, 4, n, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------
# 4a. redirects


def test_redirect_to_non_loopback_http_refused(kaggle_dir, tmp_path):
    """allow_http permits plain http to 127.0.0.1 only; a redirect elsewhere is checked by the same rule."""
    (tmp_path / "www").mkdir()
    target = "http://mirror:SECRETPW@example.invalid/hpa.zip?X-Amz-Signature=SIGVALUE"
    with serve(tmp_path / "www", redirects={"/hpa.zip": target}) as base:
        with pytest.raises(DataError) as info:
            dl.download(f"{base}/hpa.zip?token=abc", tmp_path / "out", allow_http=True)
    message = str(info.value)
    assert f"{base}/hpa.zip?…: refused redirect to http://example.invalid/hpa.zip?…" in message
    assert "\n" not in message and not any(s in message for s in ("SECRETPW", "SIGVALUE", "abc", "mirror"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_https_to_http_downgrade_refused(kaggle_dir, tmp_path, tls):
    """https -> plain http (even to loopback) is refused without allow_http; https -> https is followed."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hpa.zip").write_bytes(zip_bytes(layout_files(kaggle_dir)))
    with serve(tmp_path / "www") as plain:
        moved = {"/down.zip": f"{plain}/hpa.zip", "/same.zip": "/hpa.zip"}
        with serve(tmp_path / "www", redirects=moved, tls=tls) as secure:
            with pytest.raises(DataError, match=f"^{secure}/down.zip: refused redirect to {plain}/hpa.zip: only https"):
                dl.download(f"{secure}/down.zip", tmp_path / "out")
            assert not (tmp_path / "out" / "manifest.json").exists()
            result = dl.download(f"{secure}/same.zip", tmp_path / "out")
    assert result["n_train"] == 8


# ---------------------------------------------------------------------------------------------
# 4b. compression bombs


def test_zip_member_ratio_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(zip_bytes({"hpa/zeros.bin": b"\0" * (8 * MB)}))
    with pytest.raises(DataError, match=r"bomb.zip: archive entry 'hpa/zeros.bin' expands more than 200 times"):
        extract_archive(bomb, tmp_path / "x")
    assert (tmp_path / "x" / "hpa" / "zeros.bin").stat().st_size <= 201 * bomb.stat().st_size + MB
    extract_archive(bomb, tmp_path / "y", max_ratio=10_000)  # the ratio is a parameter
    assert (tmp_path / "y" / "hpa" / "zeros.bin").stat().st_size == 8 * MB


def test_zip_per_member_cap(tmp_path):
    archive = tmp_path / "big.zip"
    archive.write_bytes(zip_bytes({"a.bin": low_entropy(300_000), "b.bin": low_entropy(2 * MB, 1)}))
    with pytest.raises(DataError, match=r"archive entry 'b.bin' unpacks to more than the per-file limit of 1048576"):
        extract_archive(archive, tmp_path / "x", max_member_bytes=MB)
    assert (tmp_path / "x" / "a.bin").stat().st_size == 300_000
    assert (tmp_path / "x" / "b.bin").stat().st_size <= MB


def test_zip_lying_headers_stopped(tmp_path):
    """Headers declare 1000 bytes, the data holds 5 MiB: the header check passes, the stream must not."""
    archive = tmp_path / "liar.zip"
    archive.write_bytes(lying_zip())
    with pytest.raises(DataError) as info:
        extract_archive(archive, tmp_path / "x", max_bytes=100_000, max_ratio=1e9)
    assert str(info.value).startswith(f"{archive}: ") and "\n" not in str(info.value)
    assert sum(p.stat().st_size for p in (tmp_path / "x").rglob("*") if p.is_file()) <= 100_000


def test_tar_gz_ratio_on_the_total(tmp_path):
    """Many small zero files: no single one is large, the whole tar.gz expands ~1000 times."""
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(tar_bytes({f"hpa/z{i}.bin": b"\0" * 200_000 for i in range(30)}))
    with pytest.raises(DataError, match=r"bomb.tar.gz: archive entry 'hpa/z\d+.bin' expands more than 200 times"):
        extract_archive(archive, tmp_path / "x")
    written = sum(p.stat().st_size for p in (tmp_path / "x").rglob("*") if p.is_file())
    assert written <= 201 * archive.stat().st_size + MB


# ---------------------------------------------------------------------------------------------
# 4c. nested archives


def test_inner_archive_shares_the_budget(kaggle_dir, tmp_path):
    """An outer zip of ~120 kB holding train.zip that unpacks to 400 kB: over a 300 kB budget in all."""
    www = tmp_path / "www"
    www.mkdir()
    inner = zip_bytes({"x_red.png": low_entropy(400_000)})
    (www / "hpa.zip").write_bytes(zip_bytes({"hpa/train.csv": b"Id,Target\nx,0\n", "hpa/train.zip": inner},
                                            compression=zipfile.ZIP_STORED))
    assert (www / "hpa.zip").stat().st_size < 300_000
    with serve(www) as base:
        with pytest.raises(DataError) as info:
            dl.download(f"{base}/hpa.zip", tmp_path / "out", max_bytes=300_000, allow_http=True)
    assert str(info.value) == (f"{base}/hpa.zip (inner hpa/train.zip): unpacks to more than the limit of "
                               "300000 bytes")


def test_nesting_deeper_than_two_levels_refused(tmp_path):
    archive = tmp_path / "outer.zip"
    archive.write_bytes(zip_bytes({"a/mid.tar.gz": tar_bytes({"deep.zip": zip_bytes({"x.txt": b"x"})})}))
    with pytest.raises(DataError, match=r"^\S+outer.zip \(inner a/mid.tar.gz\) \(inner deep.zip\): refused: "
                                        r"archives nested more than 2 levels deep$"):
        extract_archive(archive, tmp_path / "x")


def test_inner_zips_per_split_with_their_own_folder(kaggle_dir, tmp_path):
    """A mirror zipping each split with its folder (train.zip holds train/...): unpacked to train/<files>."""
    www = tmp_path / "www"
    www.mkdir()
    files = {f"hpa/{name}": (kaggle_dir / name).read_bytes() for name in ("train.csv", "sample_submission.csv")}
    for split in ("train", "test"):
        files[f"hpa/{split}.zip"] = zip_bytes(layout_files(kaggle_dir / split, f"{split}/"))
    (www / "hpa.tgz").write_bytes(tar_bytes(files))
    with serve(www) as base:
        result = dl.download(f"{base}/hpa.tgz", tmp_path / "out", allow_http=True)
    assert (result["n_train"], result["n_test"]) == (8, 4)
    assert len(list((tmp_path / "out" / "train").iterdir())) == 32


# ---------------------------------------------------------------------------------------------
# 4d. every archive error is one line naming the URL the user gave


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bad_gzip_crc(data: bytes) -> bytes:
    out = bytearray(data)
    out[-8] ^= 0xFF  # the gzip trailer's CRC-32
    return bytes(out)


def _corrupt_central_directory(data: bytes) -> bytes:
    out = bytearray(data)
    central = out.rfind(b"PK\x01\x02")
    out[central:central + 46] = b"\xAA" * 46
    return bytes(out)


CORRUPT = {  # case: (archive bytes from the Kaggle layout, what the one line must say)
    "corrupt-zip": (lambda k: _corrupt_central_directory(zip_bytes(layout_files(k))),
                    "corrupt or unreadable zip archive (Bad magic number for central directory)"),
    "truncated-zip": (lambda k: _truncated(zip_bytes(layout_files(k))), "corrupt or unreadable zip archive"),
    "crc-error-zip": (crc_error_zip, "corrupt or unreadable zip archive (Bad CRC-32 for file 'hpa/"),
    "lying-headers-zip": (lambda k: lying_zip(),
                          "corrupt or unreadable zip archive (Bad CRC-32 for file 'hpa/big.bin')"),
    "truncated-tar-gz": (lambda k: _truncated(tar_bytes(layout_files(k))),
                         "corrupt or unreadable tar archive (Compressed file ended"),
    "truncated-tar": (lambda k: _truncated(tar_bytes(layout_files(k), mode="w")),
                      "truncated tar archive (it ends without an end-of-archive marker)"),
    "bad-gzip-crc": (lambda k: _bad_gzip_crc(tar_bytes(layout_files(k))),
                     "corrupt or unreadable tar archive (CRC check failed"),
    "bad-gzip-data": (lambda k: gzip.compress(b"x" * 1000)[:20] + b"\xff" * 200,
                      "corrupt or unreadable tar archive (zlib error"),
    "not-an-archive": (lambda k: b"<html>Sign in to continue</html>", "not a zip or tar archive"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_archive_error_is_one_line_naming_the_url(case, kaggle_dir, tmp_path):
    build, expected = CORRUPT[case]
    www = tmp_path / "www"
    www.mkdir()
    (www / "hpa.bin").write_bytes(build(kaggle_dir))
    with serve(www) as base:
        with pytest.raises(DataError) as info:
            dl.download(f"{base}/hpa.bin?sig=tok3n", tmp_path / "out", allow_http=True)
    message = str(info.value)
    assert message.startswith(f"{base}/hpa.bin?…: {expected}") and "\n" not in message, message
    assert "hpa-download-" not in message and "/tmp" not in message and "tok3n" not in message
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# 5. CSV dialects: parsed by a real CSV reader, stored in one canonical dialect


DIALECTS = {
    "quote-all": dict(quoting=csv.QUOTE_ALL),
    "quote-nonnumeric": dict(quoting=csv.QUOTE_NONNUMERIC),
    "quote-minimal": dict(quoting=csv.QUOTE_MINIMAL),
    "crlf": dict(lineterminator="\r\n"),
    "lf": dict(lineterminator="\n"),
    "utf-8-bom": dict(encoding="utf-8-sig"),
    "extra-column-comma-newline": dict(extra=True),
    "normal": dict(),
}


def _canonical(df: pd.DataFrame, kind: str) -> bytes:
    columns = ["Id", kind] + [c for c in df.columns if c not in ("Id", kind)]
    return df[columns].to_csv(index=False, lineterminator="\n").encode()


@pytest.mark.parametrize("dialect", DIALECTS)
def test_csv_dialects_round_trip(dialect, kaggle_dir, tmp_path):
    options = dict(DIALECTS[dialect])
    extra = options.pop("extra", False)
    source = tmp_path / "src"
    source.mkdir()
    for split in ("train", "test"):
        (source / split).symlink_to(kaggle_dir / split)
    tables = {}
    for name, kind in (("train.csv", "Target"), ("sample_submission.csv", "Predicted"),
                       ("test_labels.csv", "Target")):
        df = pd.read_csv(kaggle_dir / name, dtype=str, keep_default_na=False)
        if kind == "Target":  # stored canonically ("0 25"); the source may list labels in any order
            df[kind] = [" ".join(reversed(t.split())) for t in df[kind]]
        if extra:
            df.insert(1, "Note", [f"cell {i}, with a comma\nand a newline" for i in range(len(df))])
        df.to_csv(source / name, index=False, **options)
        tables[name] = df
    assert cli_main(["download", "--source", str(source), "--dest", str(tmp_path / "out"), "--n-train", "5",
                     "--n-test", "3", "--seed", "2"]) == 0
    out = tmp_path / "out"
    stored, original = read_labels(out / "train.csv"), read_labels(source / "train.csv")
    assert len(stored) == 5 and set(stored["Id"]) <= set(original["Id"])
    expected = original[original["Id"].isin(set(stored["Id"]))].drop(columns="labels").reset_index(drop=True)
    assert stored["labels"].tolist() == original.set_index("Id").loc[stored["Id"], "labels"].tolist()
    assert (out / "train.csv").read_bytes() == _canonical(expected, "Target")
    test_ids = read_sample_submission(out / "sample_submission.csv")["Id"]
    test_labels = read_labels(out / "test_labels.csv")
    assert len(test_ids) == 3 and test_labels["Id"].tolist() == test_ids.tolist()
    source_test = read_labels(source / "test_labels.csv").set_index("Id")
    assert test_labels["labels"].tolist() == source_test.loc[test_ids, "labels"].tolist()
    assert (out / "test_labels.csv").read_bytes() == _canonical(test_labels.drop(columns="labels"), "Target")
    if extra:
        assert stored.columns.tolist()[:3] == ["Id", "Target", "Note"]
        assert all(", with a comma\nand a newline" in note for note in stored["Note"])


# ---------------------------------------------------------------------------------------------
# 8 (part). errors name the user's file or URL, not the deleted staging directory


def _corrupt_first_png(root: Path) -> str:
    victim = sorted((root / "train").iterdir())[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return victim.name


def test_bad_image_in_a_directory_names_the_directory(kaggle_dir, tmp_path, capsys):
    source = tmp_path / "mydata"
    shutil.copytree(kaggle_dir, source)
    name = _corrupt_first_png(source)
    assert cli_main(["download", "--source", str(source), "--dest", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {source}/train/{name}") and "hpa-download-" not in err, err
    (source / "train" / name).unlink()
    with pytest.raises(DataError, match=f"^{source}/train: missing "):
        dl.download(str(source), tmp_path / "out")


def test_bad_image_in_an_archive_names_the_url(kaggle_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(kaggle_dir, copy)
    name = _corrupt_first_png(copy)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hpa.zip").write_bytes(zip_bytes(layout_files(copy)))
    (tmp_path / "www" / "empty.zip").write_bytes(zip_bytes({"readme.txt": b"nothing here"}))
    with serve(tmp_path / "www") as base:
        with pytest.raises(DataError) as info:
            dl.download(f"{base}/hpa.zip?k=1", tmp_path / "out", allow_http=True)
        assert str(info.value).startswith(f"{base}/hpa.zip?…!/hpa/train/{name}"), str(info.value)
        with pytest.raises(DataError, match=rf"^{base}/empty.zip: no train.csv found"):
            dl.download(f"{base}/empty.zip", tmp_path / "out", allow_http=True)
