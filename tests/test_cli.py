"""The command line contracts: inspect --json fields, --dot, export parity, bench, exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitgraph.cli.commands import main

HANDMADE = str(Path(__file__).with_name("handmade.py")) + ":handmade_vit"
TINY = ["deit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2,embed_dim=64,num_heads=2"]


def test_inspect_json_contract(capsys):
    assert main(["inspect", *TINY, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"model", "input_size", "flops", "params", "embed_dim", "prefix_tokens", "tokens", "blocks"} <= set(data)
    assert data["input_size"] == [3, 32, 32] and data["embed_dim"] == 64
    assert data["prefix_tokens"] == 1 and data["tokens"] == 17
    assert len(data["blocks"]) == 2
    for b in data["blocks"]:
        assert {"index", "attention", "mlp", "skippable", "token_prunable", "flops", "params"} <= set(b)
        assert b["attention"]["kind"] == "msa" and b["attention"]["heads"] == 2
        assert b["attention"]["head_dim"] == 32 and b["mlp"]["hidden"] == 256


def test_inspect_table_and_dot(capsys, tmp_path):
    dot = tmp_path / "blocks.dot"
    assert main(["inspect", HANDMADE, "--input-size", "3,32,32", "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "blocks.2" in out and "heads" in out and "pooling token" in out
    text = dot.read_text()
    assert text.startswith("digraph") and text.count("->") == 5  # input, embed, 3 blocks, head


def test_model_kwargs_and_file_function(capsys):
    assert main(["inspect", HANDMADE, "--model-kwargs", "depth=2,heads=2", "--input-size", "3,32,32",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [b["attention"]["heads"] for b in data["blocks"]] == [2, 2]


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "deit_tiny_patch16_22"], "deit_tiny_patch16_224"),                    # close names
    (["inspect", "no/such/file.py:fn"], "does not exist"),
    (["inspect", *TINY, "--input-size", "3,64,64"], "3x32x32"),                          # expected size
    (["inspect", *TINY, "--input-size", "3,64"], "C,H,W"),
    (["inspect", "deit_tiny_patch16_224", "--model-kwargs", "img_size"], "key=value"),
    (["inspect", *TINY, "--checkpoint", "/nonexistent.pth"], "does not exist"),
])
def test_bad_input_exits_2_with_one_paragraph(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_checkpoint_roundtrip(tmp_path, capsys):
    import timm
    import torch
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                              num_heads=2)
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pth")
    assert main(["inspect", *TINY, "--checkpoint", str(tmp_path / "ck.pth"), "--json"]) == 0
    torch.save({"model": {"bogus": torch.zeros(1)}}, tmp_path / "bad.pth")
    assert main(["inspect", *TINY, "--checkpoint", str(tmp_path / "bad.pth")]) == 2
    assert "missing" in capsys.readouterr().err


def test_export_onnx_prints_parity(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", *TINY, "--target", "onnx", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "max abs error" in text


def test_bench_json(capsys):
    assert main(["bench", *TINY, "--batch", "1,2", "--targets", "eager,onnx", "--repeats", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["batch"], r["target"]) for r in rows} == {(1, "eager"), (1, "onnx"), (2, "eager"), (2, "onnx")}
    assert all(r["median_ms"] > 0 for r in rows)


def _hostile_files(tmp: Path) -> dict[str, str]:
    """Files a user can hand the CLI by mistake: each must end in exit 2 with the fix named."""
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81 not text")
    (tmp / "ok.yaml").write_text("budget: {flops: 0.5}\n")
    (tmp / "truncated.pth").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 2)
    torch.save([1, 2, 3], tmp / "list.pth")
    (tmp / "raises.py").write_text("def build():\n    raise RuntimeError('no weights here')\n")
    (tmp / "broken_import.py").write_text("import not_a_module_anywhere\n\ndef build():\n    pass\n")
    (tmp / "a_file").write_text("")
    return {k: str(tmp / k) for k in ("binary.yaml", "ok.yaml", "truncated.pth", "list.pth", "raises.py",
                                      "broken_import.py", "a_file")}


@pytest.mark.parametrize("case, needle", [
    ("spec_not_text", "not UTF-8 text"),
    ("corrupt_checkpoint", "could not be read"),
    ("checkpoint_not_a_state_dict", "holds a list"),
    ("builder_raises", "no weights here"),
    ("model_file_import_fails", "not_a_module_anywhere"),
    ("out_is_a_file", "is a file"),
])
def test_hostile_files_exit_2_naming_the_fix(case, needle, tmp_path, capsys):
    f = _hostile_files(tmp_path)
    argv = {
        "spec_not_text": ["compile", *TINY, "--spec", f["binary.yaml"], "--data", "none",
                          "--out", str(tmp_path / "o")],
        "corrupt_checkpoint": ["inspect", *TINY, "--checkpoint", f["truncated.pth"]],
        "checkpoint_not_a_state_dict": ["inspect", *TINY, "--checkpoint", f["list.pth"]],
        "builder_raises": ["inspect", f"{f['raises.py']}:build", "--input-size", "3,32,32"],
        "model_file_import_fails": ["inspect", f"{f['broken_import.py']}:build", "--input-size", "3,32,32"],
        "out_is_a_file": ["compile", *TINY, "--spec", f["ok.yaml"], "--data", "none", "--out", f["a_file"]],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
