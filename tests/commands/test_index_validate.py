"""`index validate --manifest` checks each unit's .bin/.idx against the manifest's hashes."""

from __future__ import annotations

import os

import pytest

from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.data.manifest import MANIFEST_NAME


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, tiny_corpus, sp_model_path) -> str:
    from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess

    out = str(tmp_path_factory.mktemp("validate") / "data")
    run_preprocess(
        PreprocessConfig(
            input=[tiny_corpus], out=out, tokenizer=sp_model_path, partition_by=["fos"]
        )
    )
    return out


@pytest.fixture
def data(manifest, tmp_path):
    import shutil

    from megablocks_ablate.data.manifest import Manifest

    dst = str(tmp_path / "data")
    shutil.copytree(manifest, dst)
    return Manifest.load(dst)


def _flip_low_bit(path: str, offset: int = 10, keep_stamp: bool = False) -> None:
    """Change one byte in place (size kept): the low bit of a token id's low byte, so
    the id stays inside the vocabulary and only the hash can tell."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x01]))
    if keep_stamp:  # the old mtime back: a stamp cache would take it as unchanged
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _errors(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]


def test_a_flipped_byte_in_a_unit_bin_is_caught(data, capsys):
    units = sorted(data.units)
    assert cli_main(["index", "validate", "--manifest", data.root]) == 0
    out = capsys.readouterr().out
    assert out.count(".bin/.idx hashes match the manifest") == len(units)
    unit = units[1]
    prefix = data.unit_prefix(unit)
    bin_path = prefix + ".bin"
    _flip_low_bit(bin_path, keep_stamp=True)
    # the structure and every token id are still valid: without the manifest, ok
    assert cli_main(["index", "validate", prefix]) == 0
    capsys.readouterr()
    assert cli_main(["index", "validate", "--manifest", data.root]) == 2
    captured = capsys.readouterr()
    errors = [x for x in captured.err.splitlines() if x.startswith("error: ")]
    manifest_file = os.path.join(data.root, MANIFEST_NAME)
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {bin_path}: sha256 ")
    assert f"recorded for unit {unit!r}'s .bin in {manifest_file}" in errors[0]
    assert f"1 of {len(units)} datasets invalid" in captured.err
    assert f"ok {prefix}:" not in captured.out
    # a PREFIX with --manifest: that unit's hashes are checked too
    assert cli_main(["index", "validate", "--manifest", data.root, prefix + ".bin"]) == 2
    assert _errors(capsys)[0].startswith(f"error: {bin_path}: sha256 ")
    other = data.unit_prefix(units[0])
    assert cli_main(["index", "validate", "--manifest", data.root, other]) == 0
    assert ".bin/.idx hashes match the manifest" in capsys.readouterr().out


def test_each_mismatch_is_reported_by_path(data, capsys):
    units = sorted(data.units)
    a, b = data.unit_prefix(units[0]), data.unit_prefix(units[2])
    _flip_low_bit(a + ".bin")
    _flip_low_bit(b + ".bin", offset=20)
    with open(b + ".idx", "ab") as f:  # a size change is named with both sizes
        f.write(b"\0")
    assert cli_main(["index", "validate", "--manifest", data.root]) == 2
    errors = _errors(capsys)
    assert any(e.startswith(f"error: {a}.bin: sha256 ") for e in errors)
    assert any(e.startswith(f"error: {b}.bin: sha256 ") for e in errors)
    size = os.path.getsize(b + ".idx")
    assert any(
        e.startswith(f"error: {b}.idx: {size} bytes, ") and f"records {size - 1}" in e
        for e in errors
    )
