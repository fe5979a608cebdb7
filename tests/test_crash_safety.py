"""`vitgraph compile --out DIR` under a kill: DIR appears only complete, `--resume` continues bit-exactly,
and every bad output path or checkpoint is an exit-2 error naming the path and the fix."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitgraph.cli.commands import main
from vitgraph.report.outdir import RUN, Output, resumable
from vitgraph.spec import Spec

MODEL = [str(Path(__file__).with_name("handmade.py")) + ":handmade_vit",  # seeds its own weights
         "--model-kwargs", "image=16,patch=4,dim=32,depth=2,heads=2,hidden=64", "--input-size", "3,16,16"]
STEPS = 24
SPEC = ("preset: wdpruning\nbudget: {flops: 0.5}\n"
        f"train: {{steps: {STEPS}, batch_size: 16, lr: 1.0e-3, checkpoint_every: 2, log_every: 4}}\n")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # both runs alike; one thread each on a small shared machine


def _command(spec: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitgraph", "compile", *MODEL, "--spec", str(spec), "--data", "digits",
            "--out", str(out), "--quiet", "--targets", "", *extra]


def _kill_at_first_checkpoint(command: list[str], ckpt: Path) -> None:
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def _stable(report: dict) -> dict:
    """report.json less what a clock decides."""
    out = {k: v for k, v in report.items() if k not in ("seconds", "latency_ms", "train")}
    out["train"] = {k: v for k, v in report["train"].items() if k not in ("seconds", "images_per_s")}
    return out


def test_killed_compile_leaves_no_report_and_resumes_bit_exact(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    straight_out, out = tmp_path / "straight", tmp_path / "run"
    straight = subprocess.Popen(_command(spec, straight_out), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)  # the uninterrupted run, alongside
    ckpt = out.with_name("run.partial") / "train" / "checkpoint.pt"
    _kill_at_first_checkpoint(_command(spec, out), ckpt)

    assert not out.exists() and not (out / "report.json").exists()
    assert 0 < torch.load(ckpt, weights_only=True)["step"] < STEPS
    resumed = subprocess.run(_command(spec, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-3000:]

    assert not out.with_name("run.partial").exists()
    assert {"model.pt2", "compact.pt", "spec.yaml", "report.json", "report.md", "train"} <= {
        p.name for p in out.iterdir()}
    for name in ("compact.pt", "train/checkpoint.pt"):
        a, b = (torch.load(d / name, weights_only=False) for d in (straight_out, out))
        a, b = (x.state_dict() if name == "compact.pt" else x["model"] for x in (a, b))
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    reports = [json.loads((d / "report.json").read_text()) for d in (straight_out, out)]
    assert reports[0]["train"]["steps"] == STEPS
    assert _stable(reports[0]) == _stable(reports[1])
    metrics = [[json.loads(x) for x in (d / "train" / "metrics.jsonl").read_text().splitlines()]
               for d in (straight_out, out)]
    assert [(r["step"], r.get("loss")) for r in metrics[0]] == [(r["step"], r.get("loss")) for r in metrics[1]]


# -- output path errors: exit 2, the path and the fix, no traceback --------------------------------------------

def _compile(tmp_path: Path, out: Path, *extra: str, spec: str = SPEC) -> list[str]:
    (tmp_path / "spec.yaml").write_text(spec)
    return ["compile", *MODEL, "--spec", str(tmp_path / "spec.yaml"), "--data", "digits", "--out", str(out),
            "--quiet", "--targets", "", *extra]


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


def _fake_run(out: Path, run: dict) -> Path:
    """An interrupted run's train folder: a checkpoint file and the run.json naming its model and spec."""
    train = Output.at(out).train
    train.mkdir(parents=True)
    torch.save({"format": 1, "step": 2}, train / "checkpoint.pt")
    (train / RUN).write_text(json.dumps(run))
    return train


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("x")
    _fails(_compile(tmp_path, tmp_path / "taken"), capsys, str(tmp_path / "taken"), "is a file", "Name a new")
    _fails(_compile(tmp_path, tmp_path / "taken" / "out"), capsys, str(tmp_path / "taken"), "is a file",
           "in a folder")


def test_out_in_an_unwritable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 0o500 folder is writable anyway")
        _fails(_compile(tmp_path, locked / "out"), capsys, str(locked), "make", "writable")
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_resume_without_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _fails(_compile(tmp_path, out, "--resume"), capsys, str(out.with_name("out.partial") / "train" / "checkpoint.pt"),
           str(out / "train" / "checkpoint.pt"), "drop --resume")


def test_resume_from_a_truncated_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    ckpt = _fake_run(out, {}) / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    _fails(_compile(tmp_path, out, "--resume"), capsys, str(ckpt), "truncated", "drop --resume")


def test_resume_with_another_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    other = Spec.from_dict({"preset": "wdpruning", "budget": {"flops": 0.4},
                            "train": {"steps": 99, "batch_size": 16, "lr": 1e-3}})
    train = _fake_run(out, {"spec": resumable(other)})
    err = _fails(_compile(tmp_path, out, "--resume"), capsys, str(train), "budget.flops: 0.4 there, 0.5 here",
                 "that run's spec")
    assert "train.steps" not in err.split("(")[1]  # the total may grow on a resume


def test_resume_with_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    spec = Spec.from_dict({"preset": "wdpruning", "budget": {"flops": 0.5},
                           "train": {"steps": STEPS, "batch_size": 16, "lr": 1e-3}})
    model = {"name": "deit_tiny_patch16_224", "input_size": [3, 16, 16], "params": 5_000, "weights": "0123abcd"}
    train = _fake_run(out, {"model": model, "spec": resumable(spec)})
    _fails(_compile(tmp_path, out, "--resume"), capsys, str(train), "deit_tiny_patch16_224 (5,000 params",
           "handmade.py:handmade_vit (", "--checkpoint", "drop --resume")


# -- the final rename ----------------------------------------------------------------------------------------------

def test_commit_replaces_an_earlier_output_and_keeps_foreign_files(tmp_path: Path) -> None:
    for name, foreign in (("ours", False), ("mine", True)):
        output = Output.at(tmp_path / name)
        output.final.mkdir()
        (output.final / "report.json").write_text("old")
        (output.final / "report.md").write_text("old")
        if foreign:
            (output.final / "notes.txt").write_text("keep me")
        output.begin(resume=False, identity=None)
        (output.work / "report.json").write_text("new")
        output.commit()
        assert {p.name for p in tmp_path.iterdir()} >= {name} and not output.work.exists()
        assert (output.final / "report.json").read_text() == "new"
        assert (output.final / "report.md").exists() == foreign  # replaced whole, or merged into
        assert (output.final / "notes.txt").exists() == foreign
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_of_a_finished_run_copies_its_checkpoint_and_leaves_it_whole(tmp_path: Path) -> None:
    output = Output.at(tmp_path / "out")
    spec = {"spec": {"budget": {"flops": 0.5}}}
    train = output.final / "train"
    train.mkdir(parents=True)
    (output.final / "report.json").write_text("finished")
    torch.save({"format": 1, "step": STEPS}, train / "checkpoint.pt")
    (train / RUN).write_text(json.dumps(spec))
    assert output.begin(resume=True, identity=spec) == train / "checkpoint.pt"
    assert (output.train / "checkpoint.pt").read_bytes() == (train / "checkpoint.pt").read_bytes()
    assert (output.final / "report.json").read_text() == "finished" and (output.train / RUN).is_file()
    assert output.checkpoint() == output.train / "checkpoint.pt"  # from now on, the copy is the run's
