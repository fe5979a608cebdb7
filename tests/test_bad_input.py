"""Every bad input to the CLI ends with exit code 2 and one paragraph on stderr that names the problem and the
fix, with no traceback: models, checkpoints, input sizes, specs (types and ranges at every level), data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitgraph.cli.commands import main

HANDMADE = str(Path(__file__).with_name("handmade.py")) + ":handmade_vit"
TINY_KWARGS = "img_size=32,patch_size=8,depth=2,embed_dim=64,num_heads=2"
TINY = ["deit_tiny_patch16_224", "--model-kwargs", TINY_KWARGS]

USER_MODELS = '''
import torch
from torch import nn

def raises():
    raise ValueError("depth must be positive")

def not_a_module():
    return 42

def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


class Unfinished(nn.Module):
    def forward(self, x):
        raise NotImplementedError("forward is not written yet")


class TwoInputs(nn.Module):
    def forward(self, x, mask):
        return x * mask


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 10)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def unfinished():
    return Unfinished()


def two_inputs():
    return TwoInputs()


def value_branch():
    return ValueBranch()


from timm.layers import register_notrace_module


@register_notrace_module
class OpaqueMixer(nn.Module):  # attention inside a module fx kept whole (timm notrace); torch.export enters it
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return x + self.attn(x, x, x)[0]


def conv_attention():  # attention whose q/k/v are one 1x1 convolution: recognition does not take it apart
    class ConvAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Conv2d(3, 24, 1)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)
            attn = (q.transpose(1, 2) @ k).softmax(-1)
            return self.head((attn @ v.transpose(1, 2)).mean(1))
    return ConvAttention()


def opaque_vit():
    class Vit(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 8, 8)
            self.mixer = OpaqueMixer()
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            return self.head(self.mixer(x).mean(1))
    return Vit()
'''


def _bad(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run the CLI; it must exit 2 with one paragraph naming every needle, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.startswith(f"vitgraph {argv[0]}: error: ") and err.strip().count("\n") == 0, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


@pytest.fixture
def user_file(tmp_path: Path) -> str:
    path = tmp_path / "mymodels.py"
    path.write_text(USER_MODELS)
    return str(path)


# -- models ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("func, needles", [
    ("raises", ("raises", "ValueError", "depth must be positive")),
    ("not_a_module", ("not_a_module", "int", "nn.Module")),
    ("missing", ("missing",)),
    ("unfinished", ("unfinished", "NotImplementedError", "mymodels.py")),   # its forward raises
    ("two_inputs", ("two_inputs", "mask", "forward")),                      # its forward takes two inputs
    ("value_branch", ("value_branch", "x.sum() > 0", "leaf")),              # branches on tensor values
])
def test_user_function(func, needles, user_file, capsys):
    _bad(["inspect", f"{user_file}:{func}", "--input-size", "3,32,32"], capsys, *needles)


def test_user_file_that_does_not_import(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text("def handmade(:\n")
    _bad(["inspect", f"{path}:handmade", "--input-size", "3,32,32"], capsys, "broken.py", "SyntaxError")


def test_user_model_without_an_input_size(capsys):
    _bad(["inspect", HANDMADE], capsys, "handmade_vit", "--input-size")


@pytest.mark.parametrize("ref, needle", [
    ("resnet_nonsense_77", "resnet_nonsense_77"),
    ("no_such_package_xyz.models:build", "no_such_package_xyz.models"),
])
def test_unknown_model(ref, needle, capsys):
    _bad(["inspect", ref], capsys, needle)


def test_folder_that_is_not_a_compile_output(tmp_path, capsys):
    _bad(["inspect", str(tmp_path)], capsys, str(tmp_path), "compact.pt")


@pytest.mark.parametrize("compact, report, needle", [
    (b"\x00garbage" * 10, None, "compact.pt"),
    (b"", None, "compact.pt"),
    ("state", b"{not json", "report.json"),
])
def test_broken_compile_output(compact, report, needle, tmp_path, capsys):
    if compact == "state":
        torch.save(torch.nn.Linear(2, 2), tmp_path / "compact.pt")
    else:
        (tmp_path / "compact.pt").write_bytes(compact)
    if report is not None:
        (tmp_path / "report.json").write_bytes(report)
    _bad(["inspect", str(tmp_path)], capsys, needle, "compile again")


def test_cnn_is_refused_by_compile(user_file, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("budget: {flops: 0.5}\n")
    _bad(["compile", f"{user_file}:cnn", "--input-size", "3,32,32", "--spec", str(spec), "--out",
          str(tmp_path / "out")], capsys, "cnn", "not a Vision Transformer")


def test_attention_inside_a_notrace_leaf_is_seen_and_its_refusal_named(user_file, tmp_path, capsys):
    # capture enters timm's notrace modules: the attention inside is found (nn.MultiheadAttention's fused
    # in-projection parameter maps to no head rows), and the refusal names that site and why
    spec = tmp_path / "spec.yaml"
    spec.write_text("budget: {flops: 0.5}\n")
    _bad(["compile", f"{user_file}:opaque_vit", "--input-size", "3,32,32", "--spec", str(spec), "--out",
          str(tmp_path / "out")], capsys, "opaque_vit", "mixer.attn", "could not map every head")


def test_attention_recognition_cannot_take_apart_is_named(user_file, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("budget: {flops: 0.5}\n")
    _bad(["compile", f"{user_file}:conv_attention", "--input-size", "3,16,16", "--spec", str(spec), "--out",
          str(tmp_path / "out")], capsys, "conv_attention", "attention that vitgraph does not recognise", "%softmax")


def test_timm_cnn_is_refused_by_compile(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("budget: {flops: 0.5}\n")
    _bad(["compile", "resnet18", "--input-size", "3,32,32", "--spec", str(spec), "--out",
          str(tmp_path / "out")], capsys, "resnet18", "not a Vision Transformer", "self-attention")


@pytest.mark.parametrize("argv, needle", [
    (["--input-size", "3,32"], "--input-size"),
    (["--input-size", "0,32,32"], "--input-size"),
    (["--input-size", "a,b,c"], "--input-size"),
    (["--input-size", "1,32,32"], "3x32x32"),
    (["--model-kwargs", "depth"], "key=value"),
])
def test_bad_size_or_kwargs(argv, needle, capsys):
    _bad(["inspect", *TINY, *argv], capsys, needle)


def test_model_kwargs_timm_rejects(capsys):
    _bad(["inspect", "deit_tiny_patch16_224", "--model-kwargs", "img_size=32,no_such_option=1"], capsys,
         "no_such_option")


def test_model_kwargs_out_of_range(capsys):
    _bad(["inspect", "deit_tiny_patch16_224", "--model-kwargs", "img_size=32,patch_size=8,depth=2,embed_dim=64,"
          "num_heads=3"], capsys, "--model-kwargs")


# -- checkpoints ----------------------------------------------------------------------------------

def _tiny_state() -> dict[str, torch.Tensor]:
    import timm
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64,
                             num_heads=2).state_dict()


def _truncated(path: Path) -> None:
    torch.save(_tiny_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, write, needle", [
    ("corrupt.pth", lambda p: p.write_bytes(b"\x89not a checkpoint" * 50), "could not be read"),
    ("truncated.pth", _truncated, "could not be read"),
    ("empty.pth", lambda p: p.write_bytes(b""), "could not be read"),
    ("list.pth", lambda p: torch.save([torch.zeros(1)], p), "state dict"),
    ("other.pth", lambda p: torch.save({"bogus": torch.zeros(1)}, p), "missing"),
    ("shapes.pth", lambda p: torch.save({k: v[..., :1] for k, v in _tiny_state().items()}, p), "shape"),
    ("bad.safetensors", lambda p: p.write_bytes(b"{not safetensors"), "could not be read"),
    ("folder.pth", lambda p: p.mkdir(), "folder.pth"),
])
def test_bad_checkpoint(name, write, needle, tmp_path, capsys):
    path = tmp_path / name
    write(path)
    _bad(["inspect", *TINY, "--checkpoint", str(path)], capsys, name, needle)


# -- spec files -----------------------------------------------------------------------------------

def _compile(spec: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["compile", *TINY, "--spec", str(spec), "--out", str(tmp_path / "out"), "--data", "none", "--quiet",
            *extra]


@pytest.mark.parametrize("name, content, needle", [
    ("binary.yaml", b"\xff\xfe\x00\x01\x80\x81" * 20, "UTF-8"),
    ("empty.yaml", b"", "empty"),
    ("blank.yaml", b"# nothing but a comment\n\n", "empty"),
    ("broken.yaml", b"budget: {flops: 0.5\nwidth: [\n", "YAML"),
    ("list.yaml", b"- budget\n- width\n", "mapping"),
    ("scalar.yaml", b"wdpruning\n", "mapping"),
])
def test_bad_spec_file(name, content, needle, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    _bad(_compile(path, tmp_path), capsys, name, needle)


def test_spec_that_does_not_exist(tmp_path, capsys):
    _bad(_compile(tmp_path / "nope.yaml", tmp_path), capsys, "nope.yaml", "does not exist")


def test_spec_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "specdir").mkdir()
    _bad(_compile(tmp_path / "specdir", tmp_path), capsys, "specdir", "folder")


SPEC_CASES = [
    # wrong YAML types at every level
    ("budget: 5", "budget"),
    ("budget: [0.5]", "budget"),
    ("width: [1]", "width"),
    ("width: {heads: 'yes'}", "width.heads"),
    ("width: {align: 'eight'}", "width.align"),
    ("width: {align: 2.5}", "width.align"),
    ("tokens: {keep: [1.5]}", "tokens.keep"),
    ("tokens: {keep: ['half']}", "tokens.keep"),
    ("tokens: {stages: 'one'}", "tokens.stages"),
    ("tokens: {stages: [1.5]}", "tokens.stages"),
    ("tokens: {stages: [[1]]}", "tokens.stages"),
    ("depth: {exits: ['a']}", "depth.exits"),
    ("depth: {skip_blocks: 1}", "depth.skip_blocks"),
    ("train: 300", "train"),
    ("train: {steps: 'many'}", "train.steps"),
    ("train: {steps: 1.5}", "train.steps"),
    ("train: {distill: 0.5}", "train.distill"),
    ("train: {distill: {alpha: 'high'}}", "train.distill.alpha"),
    ("budget: {flops: 'half'}", "budget.flops"),
    ("budget: {flops: [0.5]}", "budget.flops"),
    ("budget: {target: 5}", "budget.target"),
    ("preset: [uvc]", "preset"),
    ("preset: {name: uvc}", "preset"),
    ("width: {method: [magnitude]}", "width.method"),
    # unknown names
    ("preset: deit", "preset"),
    ("colour: red", "colour"),
    ("width: {hedas: true}", "hedas"),
    ("width: {method: l1}", "width.method"),
    ("width: {allocation: greedy}", "width.allocation"),
    ("tokens: {method: random, stages: [1]}", "tokens.method"),
    ("tokens: {mode: fast, stages: [1]}", "tokens.mode"),
    ("budget: {flops: 0.5, target: tpu}", "budget.target"),
    # out of range, every axis
    ("budget: {flops: 0}", "budget.flops"),
    ("budget: {flops: -0.5}", "budget.flops"),
    ("budget: {flops: 1.5}", "budget.flops"),
    ("budget: {flops: null}", "budget"),
    ("budget: {flops: .nan}", "budget.flops"),
    ("budget: {latency: 0}", "budget.latency"),
    ("budget: {latency: 2.0}", "budget.latency"),
    ("budget: {flops: 0.5, tolerance: 0}", "budget.tolerance"),
    ("budget: {flops: 0.5, batch: 0}", "budget.batch"),
    ("budget: {flops: 0.5, rounds: 9}", "budget.rounds"),
    ("width: {align: 0}", "width.align"),
    ("width: {align: -8}", "width.align"),
    ("tokens: {stages: [5]}", "tokens.stages"),
    ("tokens: {stages: [1, 0]}", "tokens.stages"),
    ("tokens: {stages: [-1]}", "tokens.stages"),
    ("tokens: {stages: [1], keep: [0]}", "tokens.keep"),
    ("tokens: {stages: [1], keep: [-0.5]}", "tokens.keep"),
    ("tokens: {stages: [0, 1], keep: [0.5, 0.9]}", "tokens.keep"),
    ("tokens: {stages: [1], keep: [0.5, 0.4]}", "tokens.keep"),
    ("depth: {exits: [0]}\ntrain: {steps: 2}", "depth.exits"),
    ("depth: {exits: [7]}\ntrain: {steps: 2}", "depth.exits"),
    ("depth: {exits: [1], exit: 2}\ntrain: {steps: 2}", "depth.exit"),
    ("depth: {exits: [1]}", "depth.exits"),
    ("depth: {warmup: 1.0}", "depth.warmup"),
    ("train: {steps: -1}", "steps"),
    ("train: {lr: 0}", "lr"),
    ("train: {lr: -1.0e-3}", "lr"),
    ("train: {batch_size: 0}", "batch_size"),
    ("train: {search: 1.5}", "train.search"),
    ("train: {distill: {alpha: 1.5}}", "alpha"),
    ("train: {distill: {alpha: -0.1}}", "alpha"),
    ("train: {distill: {tau: 0}}", "tau"),
    # budgets the enabled axes cannot reach
    ("budget: {flops: 0.5}\nwidth: {heads: false, mlp: false}", "compresses nothing"),
    ("budget: {flops: 0.05}\nwidth: {heads: false, mlp: true}", "budget.flops"),
    ("budget: {flops: 0.05}\nwidth: {heads: false, mlp: false}\ndepth: {skip_blocks: true}\ntrain: {steps: 2}",
     "budget.flops"),
]


@pytest.mark.parametrize("text, needle", SPEC_CASES, ids=[t.replace("\n", "; ") for t, _ in SPEC_CASES])
def test_bad_spec_key(text, needle, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text + "\n")
    _bad(_compile(spec, tmp_path), capsys, needle)


@pytest.mark.parametrize("flag, value", [("--steps", "-1"), ("--batch-size", "0")])
def test_bad_override(flag, value, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("budget: {flops: 0.5}\n")
    _bad(_compile(spec, tmp_path, flag, value), capsys, flag)


# -- data -----------------------------------------------------------------------------------------

def _images(root: Path, sizes: dict[str, tuple[int, int]], mode: str = "RGB") -> None:
    from PIL import Image
    for name, size in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, color=128 if mode == "L" else (10, 200, 30)).save(root / name)


def _loose_images(root: Path) -> None:
    _images(root, {"x.png": (32, 32), "y.png": (32, 32)})


def _first_unreadable(root: Path) -> None:
    _images(root, {f"{c}/{i}.png": (32, 32) for c in "ab" for i in range(1, 4)})
    (root / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")


def _val_truncated(root: Path) -> None:
    _images(root, {f"{s}/{c}/{i}.png": (32, 32) for s in ("train", "val") for c in "ab" for i in range(3)})
    data = (root / "val" / "b" / "2.png").read_bytes()
    (root / "val" / "b" / "2.png").write_bytes(data[: len(data) // 2])


def _val_class_unknown(root: Path) -> None:
    _images(root, {f"{s}/{c}/0.png": (32, 32) for s, c in (("train", "a"), ("train", "b"), ("val", "zebra"))})


def _compile_on(source: str, tmp_path: Path) -> list[str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text("budget: {flops: 0.5}\n")
    return ["compile", *TINY, "--spec", str(spec), "--out", str(tmp_path / "out"), "--data", source, "--quiet"]


@pytest.mark.parametrize("source, needle", [
    ("mnist", "mnist"),
    ("imagefolder:", "imagefolder"),
    ("imagefolder:/no/such/folder", "/no/such/folder"),
])
def test_unknown_or_missing_data(source, needle, tmp_path, capsys):
    _bad(_compile_on(source, tmp_path), capsys, needle)


@pytest.mark.parametrize("make, needles", [
    (lambda r: r.mkdir(), ("no images",)),
    (_loose_images, ("own folder",)),
    (_first_unreadable, ("0.png", "remove or replace")),
    (_val_truncated, ("2.png", "remove or replace")),
    (_val_class_unknown, ("zebra",)),
])
def test_bad_imagefolder(make, needles, tmp_path, capsys):
    root = tmp_path / "imgs"
    make(root)
    _bad(_compile_on(f"imagefolder:{root}", tmp_path), capsys, *needles)


def test_mixed_image_sizes_and_modes_are_not_bad_input(tmp_path):
    """Mixed sizes and colour modes load: every image is resized to the model's input and converted to its
    channels (so the CLI's imagefolder cases above fail for the bad file, not for the mix)."""
    from vitgraph.train.data import load_data
    root = tmp_path / "imgs"
    _images(root, {f"{c}/{i}.png": (20 + 7 * i, 48 - 5 * i) for c in "ab" for i in range(5)})
    _images(root, {"a/grey.png": (50, 17), "b/grey.png": (9, 40)}, mode="L")  # 6 a class: 1 in val
    data = load_data(f"imagefolder:{root}", (3, 32, 32), batch_size=2)
    shapes = {tuple(x.shape) for split in (data.train, data.val) for x, _ in split}
    assert shapes == {(3, 32, 32)}


# -- other commands -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--budgets", "0.9:0.5:0.1"], "--budgets"),
    (["--budgets", "half"], "--budgets"),
    (["--axes", "width,colour"], "colour"),
])
def test_bad_sweep_arguments(argv, needle, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("budget: {flops: 0.5}\n")
    base = ["sweep", *TINY, "--spec", str(spec), "--out", str(tmp_path / "out"), "--budgets", "0.5:0.9:0.1"]
    _bad([*base, *argv], capsys, needle)


def test_bench_unknown_target(capsys):
    _bad(["bench", *TINY, "--targets", "eager,tensorrt"], capsys, "tensorrt")


def test_profile_too_few_samples(capsys):
    _bad(["profile", *TINY, "--samples", "1"], capsys, "--samples")


def test_debug_shows_the_traceback(user_file):
    from vitgraph.errors import ModelError
    with pytest.raises(ModelError, match="depth must be positive"):
        main(["--debug", "inspect", f"{user_file}:raises", "--input-size", "3,32,32"])


def test_a_vitgraph_bug_is_an_internal_error_not_bad_input(monkeypatch, capsys):
    """An exception no loader turned into bad input exits 1 (not 2), in one paragraph that says how to report it."""
    import vitgraph.cli.commands as cli

    def broken(args):
        raise KeyError("blocks.7")
    monkeypatch.setattr(cli, "cmd_inspect", broken)
    assert main(["inspect", *TINY]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert "internal error in inspect: KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", "inspect", *TINY])
