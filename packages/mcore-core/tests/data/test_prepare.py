"""`mcore data prepare`: text, Python and JSONL files into a Megatron dataset, optionally with a
BPE trained on them first; and registering the command keeps plugin loading light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mcore.core import cli
from mcore.core.data import ByteTokenizer, HFTokenizer, IndexedDataset
from mcore.core.plugins import reset_plugin_manager


@pytest.fixture(autouse=True)
def core_only(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MCORE_LOAD_PLUGINS", "")
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def inputs(tmp_path: Path, stdlib_files: list[Path]) -> tuple[list[Path], list[str]]:
    """Two stdlib modules as files and a JSONL of three records: five documents."""
    sources = [p.read_text(encoding="utf-8") for p in stdlib_files[:2]]
    files = []
    for i, text in enumerate(sources):
        files.append(tmp_path / f"module{i}.py")
        files[-1].write_text(text, encoding="utf-8")
    records = ["first document", "zweites Dokument: ü", "third\nwith lines"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(records)))
    return [*files, jsonl], [*sources, *records]


def prepare(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["data", "prepare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_with_the_byte_tokenizer(capsys, tmp_path: Path, inputs) -> None:
    files, texts = inputs

    code, out, _ = prepare(
        capsys, *map(str, files), "--output-prefix", str(tmp_path / "out"), "--append-eod"
    )

    assert code == 0 and "5 documents" in out
    ds = IndexedDataset(tmp_path / "out")
    tok = ByteTokenizer()
    assert ds.dtype.name == "uint16" and ds.num_documents == 5
    for i, text in enumerate(texts):
        assert ds[i][-1] == tok.eod
        assert tok.decode(ds[i].tolist()) == text


def test_prepare_trains_a_bpe_and_reuses_it(capsys, tmp_path: Path, inputs) -> None:
    files, texts = inputs
    args = [*map(str, files), "--output-prefix", str(tmp_path / "bpe"), "--train-bpe", "500"]

    code, out, _ = prepare(capsys, *args)

    assert code == 0 and "bpe.tokenizer.json" in out
    tok = HFTokenizer(tmp_path / "bpe.tokenizer.json")
    ds = IndexedDataset(tmp_path / "bpe")
    assert [tok.decode(ds[i].tolist()) for i in range(len(ds))] == texts
    assert ds.num_tokens < sum(len(t.encode()) for t in texts) / 1.5

    code, _, _ = prepare(
        capsys,
        str(files[0]),
        "--output-prefix",
        str(tmp_path / "again"),
        "--tokenizer-path",
        str(tmp_path / "bpe.tokenizer.json"),
    )
    assert code == 0
    assert IndexedDataset(tmp_path / "again")[0].tolist() == ds[0].tolist()


def test_prepare_reads_folders_and_a_json_key(capsys, tmp_path: Path) -> None:
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "src" / "b.txt").write_text("bee")
    (tmp_path / "src" / "skip.bin").write_bytes(b"\0\1")
    (tmp_path / "body.jsonl").write_text('{"body": "x"}\n\n{"body": ""}\n{"body": "yz"}\n')

    code, _, _ = prepare(
        capsys,
        str(tmp_path / "src"),
        str(tmp_path / "body.jsonl"),
        "--json-key",
        "body",
        "--output-prefix",
        str(tmp_path / "o"),
    )

    assert code == 0
    ds = IndexedDataset(tmp_path / "o")
    assert [bytes(ds[i].tolist()) for i in range(len(ds))] == [b"bee", b"a = 1\n", b"x", b"yz"]


def test_bad_input_is_reported_by_file_and_line(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')

    code, _, err = prepare(capsys, str(bad), "--output-prefix", str(tmp_path / "o"))
    assert code == 2 and "bad.jsonl:2: not JSON" in err
    assert not (tmp_path / "o.idx").exists()

    out = str(tmp_path / "o")
    code, _, err = prepare(capsys, str(bad), "--json-key", "content", "--output-prefix", out)
    assert code == 2 and "bad.jsonl:1: no key 'content'" in err

    code, _, err = prepare(capsys, str(tmp_path / "none.txt"), "--output-prefix", out)
    assert code == 2 and "does not exist" in err

    code, _, err = prepare(
        capsys, str(bad), "--output-prefix", out, "--train-bpe", "300", "--tokenizer", "byte"
    )
    assert code == 2 and "--train-bpe trains" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_loading_plugins_imports_no_numpy_torch_or_tokenizers() -> None:
    code = (
        "import sys; from mcore.core import get_plugin_manager, get_registry; "
        "get_plugin_manager(); get_registry('dataset').names(); "
        "print(sorted(m for m in ('numpy', 'torch', 'tokenizers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
