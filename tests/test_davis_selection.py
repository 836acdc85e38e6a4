"""``eval davis --sweep ... --select-on train``: select on one split, report the other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import davis_args as run_args
from conftest import write_davis

from dino_vos.cli import main

#: train: alpha (8 frames) + beta (7); val: delta (6)
DATASET = {
    "alpha": (2017, 2, 8, (48, 80)),
    "beta": (2016, 1, 7, (48, 80)),
    "delta": (2017, 2, 6, (48, 80)),
}
TRAIN_FRAMES, VAL_FRAMES = 8 + 7, 6
GRID = ["--sweep", "topk=1,3", "temperature=0.1,0.02"]


def invoke(*args: object):
    return CliRunner().invoke(main, ["eval", "davis", *map(str, args)])


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    root = write_davis(tmp_path_factory.mktemp("davis"), DATASET, split=None)
    splits = root / "ImageSets" / "2017"
    splits.mkdir(parents=True)
    (splits / "train.txt").write_text("alpha\nbeta\n")
    (splits / "val.txt").write_text("delta\n")
    (splits / "overlap.txt").write_text("beta\ndelta\n")
    return root


def global_scores(folder: Path, split: str) -> dict[str, float]:
    return json.loads((folder / f"davis_results-{split}.json").read_text())["global"]


def test_selects_on_train_and_reports_val(davis_root, tiny_weights, tmp_path):
    out = tmp_path / "selection"
    result = invoke(*run_args(davis_root, tiny_weights, out), *GRID, "--select-on", "train")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "selection.json").read_text())
    assert report["selected_on"] == "train" and report["reported_split"] == "val"
    assert report["grid"] == {"topk": [1, 3], "temperature": [0.1, 0.02]}

    # the choice is the best train score of the grid, read from each setting's own train report
    settings = sorted((out / "select-on-train" / "settings").iterdir())
    assert len(settings) == 4
    train = {folder.name: global_scores(folder, "train")["J&F-Mean"] for folder in settings}
    assert len(set(train.values())) > 1  # the grid does change the scores
    best = max(train.values())
    first_best = next(r["tag"] for r in report["selection_rows"] if r["J&F-Mean"] == best)
    assert report["chosen"]["tag"] == first_best
    assert report["selection_scores"]["J&F-Mean"] == best

    # val was scored with the chosen setting only, and equals a plain eval davis run of it
    val_reports = sorted(p.relative_to(out) for p in out.rglob("davis_results-val.json"))
    assert val_reports == [Path("chosen-val/davis_results-val.json")]
    chosen = report["chosen"]
    plain = tmp_path / "plain"
    result = invoke(
        *run_args(davis_root, tiny_weights, plain),
        "--topk", chosen["topk"], "--temperature", chosen["temperature"],
        "--cache", tmp_path / "plain-cache",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert report["reported_scores"] == {
        metric: global_scores(plain, "val")[metric] for metric in ("J&F-Mean", "J-Mean", "F-Mean")
    }

    # one feature cache: train frames computed once by the sweep, val frames once by the run
    assert sum(row["cache_misses"] for row in report["selection_rows"]) == TRAIN_FRAMES
    val_run = json.loads((out / "chosen-val" / "davis_results-val.json").read_text())
    assert val_run["cache"]["misses"] == VAL_FRAMES and val_run["cache"]["hits"] == 0
    manifest = json.loads((out / "dino-vos.json").read_text())
    assert manifest["status"] == "complete" and manifest["outputs"] == ["selection.json"]

    # a second invocation reuses every setting and the chosen run
    again = invoke(*run_args(davis_root, tiny_weights, out), *GRID, "--select-on", "train")
    assert again.exit_code == 0, again.output
    rerun = json.loads((out / "selection.json").read_text())
    assert [row["status"] for row in rerun["selection_rows"]] == ["reused"] * 4
    assert rerun["chosen"] == report["chosen"]
    assert rerun["reported_scores"] == report["reported_scores"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--select-on", "val", *GRID], "is the reported split"),
        (["--select-on", "train", "--sequences", "delta", *GRID], "drop --sequences"),
        (["--select-on", "overlap", *GRID], "share 1 sequence(s) (delta)"),
        (["--select-on", "train"], "add --sweep"),
    ],
)
def test_refuses_selecting_on_reported_data(davis_root, tiny_weights, tmp_path, extra, message):
    out = tmp_path / "out"
    result = invoke(*run_args(davis_root, tiny_weights, out), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.slow
def test_selection_under_torchrun(davis_root, tiny_weights, tmp_path):
    import os
    import subprocess
    import sys

    alone, ranks = tmp_path / "alone", tmp_path / "ranks"
    extra = [*GRID, "--select-on", "train"]
    assert invoke(*run_args(davis_root, tiny_weights, alone), *extra).exit_code == 0
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(33500 + os.getpid() % 1000), "-m", "dino_vos", "eval", "davis",
        *map(str, run_args(davis_root, tiny_weights, ranks)), *extra,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = (json.loads((o / "selection.json").read_text()) for o in (alone, ranks))
    assert two["chosen"] == one["chosen"]
    assert two["reported_scores"] == one["reported_scores"]
    run = json.loads((ranks / "chosen-val" / "davis_results-val.json").read_text())
    assert run["settings"]["world_size"] == 2
