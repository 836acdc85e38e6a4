"""Bad input gets one clear line and exit code 2, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dino_vos.cli import main
from dino_vos.errors import BackboneError
from dino_vos.masks import encode_indexed_png
from dino_vos.spec import PropagationConfig


def propagate(clip_dir: Path, out: Path, weights: Path, *extra: object, mask: Path | None = None):
    args = ["propagate", clip_dir / "frames", "--mask", mask or clip_dir / "masks" / "00000.png"]
    args += ["--out", out, "--weights", weights, "--short-side", "64", "--device", "cpu", *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(result, message: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Backbone:" not in result.output
    return errors[0]


@pytest.mark.parametrize("value", ["nan", "inf", "NaN", "Infinity"])
def test_non_finite_numbers_are_refused(clip_dir, tiny_weights, tmp_path, value):
    result = propagate(clip_dir, tmp_path / "o", tiny_weights, "--temperature", value)
    one_error(result, "is not a finite number")
    baseline = ["eval", "knn", "--train", "t", "--val", "v", "--out", "o"]
    result = CliRunner().invoke(main, [*baseline, "--temperature", value])
    assert result.exit_code == 2 and "is not a finite number" in result.output
    with pytest.raises(ValueError, match="finite"):
        PropagationConfig(temperature=float(value))


def test_radius_none_is_explicit_and_negatives_are_refused(clip_dir, tiny_weights, tmp_path):
    one_error(propagate(clip_dir, tmp_path / "o", tiny_weights, "--radius", "-1"), "is negative")
    one_error(
        propagate(clip_dir, tmp_path / "o", tiny_weights, "--radius", "big"), "is not a radius"
    )
    result = propagate(clip_dir, tmp_path / "o", tiny_weights, "--radius", "none")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "dino-vos.json").read_text())
    assert manifest["propagation"]["radius"] is None
    with pytest.raises(ValueError, match="radius"):
        PropagationConfig(radius=-2)


def test_bad_masks_say_what_to_do(clip_dir, tiny_weights, tmp_path):
    mask = np.array(Image.open(clip_dir / "masks" / "00000.png"))
    jpeg = tmp_path / "mask.jpg"
    Image.fromarray(mask * 60).save(jpeg, quality=90)
    line = one_error(propagate(clip_dir, tmp_path / "o", tiny_weights, mask=jpeg), "JPEG image")
    assert "save the annotation as a PNG" in line
    empty = tmp_path / "empty.png"
    empty.write_bytes(encode_indexed_png(np.zeros_like(mask)))
    one_error(propagate(clip_dir, tmp_path / "o", tiny_weights, mask=empty), "has no object")
    wide = tmp_path / "wide.png"
    Image.fromarray(mask.astype(np.uint16) * 300).save(wide)  # ids beyond the palette
    one_error(propagate(clip_dir, tmp_path / "o", tiny_weights, mask=wide), "outside 0..255")
    assert not (tmp_path / "o").exists()


def test_bad_videos_give_the_decoders_reason_in_one_line(clip_dir, tiny_weights, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 4096)
    code = f"""
    import sys
    from click.testing import CliRunner
    from dino_vos.cli import main
    result = CliRunner().invoke(main, ["propagate", {str(broken)!r}, "--mask",
        {str(clip_dir / "masks" / "00000.png")!r}, "--out", {str(tmp_path / "o")!r}])
    print(result.exit_code)
    print(result.output)
    """
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True
    )
    assert run.stdout.split("\n")[0] == "2"
    assert run.stderr == ""  # no decoder log lines on the terminal
    assert "cannot decode video" in run.stdout and "Invalid data found" in run.stdout


def test_evil_checkpoint_is_refused_and_never_runs(tmp_path, clip_dir):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"teacher": {"x": Evil()}}, evil)
    result = propagate(clip_dir, tmp_path / "o", evil)
    line = one_error(result, "needs the Python object posix.system to load")
    assert "weights_only" not in line and "Warning" not in result.output
    assert not marker.exists()
    from dino_vos.backbones import load_backbone

    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(BackboneError, match="is not a PyTorch checkpoint"):
        load_backbone(None, weights=text)
