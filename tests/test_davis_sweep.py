"""``eval davis --sweep``: a grid over one feature cache, resumable per setting, checked inputs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import davis_args as run_args
from conftest import write_davis

from dino_vos.cli import main
from dino_vos.errors import InputError
from dino_vos.eval.vos.sweep import SweepGrid, influence, split_tokens, tag

#: alpha (8 frames, 2 objects) and beta (7 frames, 1 object) of the generated dataset
SEQUENCES = ("--sequences", "alpha,beta")
FRAMES = 8 + 7
TAGS = ["topk1-temperature0.1", "topk1-temperature0.05", "topk3-temperature0.1",
        "topk3-temperature0.05"]  # fmt: skip


def invoke(*args: object):
    return CliRunner().invoke(main, ["eval", "davis", *map(str, args)])


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    return write_davis(tmp_path_factory.mktemp("davis"))


def sweep(root: Path, weights: Path, out: Path, repeated: bool = False):
    """The 2x2 grid, as ``--sweep A B`` or (``repeated``) as ``--sweep A --sweep B``."""
    tokens = ["temperature=0.1,0.05", "--sweep" if repeated else None, "topk=1,3"]
    result = invoke(*run_args(root, weights, out, *SEQUENCES), "--sweep", *[t for t in tokens if t])
    assert result.exit_code == 0, result.output
    return json.loads((out / "sweep.json").read_text())["rows"]


def test_sweep_grid_cache_reports_and_resume(davis_root, tiny_weights, tmp_path):
    out = tmp_path / "sweep"
    rows = sweep(davis_root, tiny_weights, out)
    assert [row["tag"] for row in rows] == TAGS
    assert [row["status"] for row in rows] == ["propagated"] * 4
    # the backbone ran once per frame: the first setting filled the cache, the others hit it
    assert sum(row["cache_misses"] for row in rows) == FRAMES
    assert rows[0]["cache_misses"] == FRAMES and rows[0]["cache_hits"] == 0
    assert all(row["cache_hits"] == FRAMES and row["cache_misses"] == 0 for row in rows[1:])
    assert (out / "feature-cache").is_dir() and (out / "sweep.png").stat().st_size > 0
    with (out / "sweep.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["tag"] for r in table] == TAGS and table[2]["topk"] == "3"
    assert float(table[1]["J&F-Mean"]) == pytest.approx(rows[1]["J&F-Mean"], abs=5e-4)
    manifest = json.loads((out / "dino-vos.json").read_text())
    assert manifest["format"] == "dino-vos-davis-sweep" and manifest["status"] == "complete"
    assert sorted(manifest["outputs"]) == ["sweep.csv", "sweep.json", "sweep.png"]

    # every row is what a plain eval davis run with those parameters gives (cached features too:
    # the cache stores fp16 features, so plain runs read from a cache of their own)
    for row in rows:
        plain = tmp_path / f"plain-{row['tag']}"
        result = invoke(
            *run_args(davis_root, tiny_weights, plain, *SEQUENCES),
            "--topk", row["topk"], "--temperature", row["temperature"],
            "--cache", tmp_path / "plain-cache",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        report = json.loads((plain / "davis_results-val.json").read_text())["global"]
        for metric in ("J&F-Mean", "J-Mean", "F-Mean"):
            assert row[metric] == report[metric], (row["tag"], metric)
    assert len({row["J&F-Mean"] for row in rows}) > 1  # the parameters do change the scores

    # a second invocation reuses every setting and computes nothing
    again = sweep(davis_root, tiny_weights, out, repeated=True)  # the same grid
    assert [row["status"] for row in again] == ["reused"] * 4
    assert [row["J&F-Mean"] for row in again] == [row["J&F-Mean"] for row in rows]
    # a deleted setting is the only one redone, from the cache
    shutil.rmtree(out / "settings" / TAGS[2])
    redone = sweep(davis_root, tiny_weights, out)
    assert [row["status"] for row in redone] == ["reused", "reused", "propagated", "reused"]
    assert redone[2]["cache_misses"] == 0 and redone[2]["cache_hits"] == FRAMES
    assert redone[2]["J&F-Mean"] == rows[2]["J&F-Mean"]
    # a setting whose reports are gone but whose masks are finished is only scored again
    (out / "settings" / TAGS[1] / "davis_results-val.json").unlink()
    rescored = sweep(davis_root, tiny_weights, out)
    assert [row["status"] for row in rescored] == ["reused", "rescored", "reused", "reused"]
    assert rescored[1]["cache_hits"] == rescored[1]["cache_misses"] == 0
    assert rescored[1]["J&F-Mean"] == rows[1]["J&F-Mean"]


def test_sweep_under_torchrun(davis_root, tiny_weights, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not found next to the Python interpreter")
    out = tmp_path / "sweep"
    command = [
        str(torchrun), "--nproc_per_node", "2", "--master_port", str(30500 + os.getpid() % 1000),
        "-m", "dino_vos", "eval", "davis", *map(str, run_args(davis_root, tiny_weights, out)),
        *SEQUENCES, "--sweep", "topk=1,3",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [row["tag"] for row in rows] == ["topk1", "topk3"]
    assert [row["status"] for row in rows] == ["propagated"] * 2
    assert sum(row["cache_misses"] for row in rows) == FRAMES  # each rank filled its share
    for row in rows:
        report = json.loads((out / "settings" / row["tag"] / "davis_results-val.json").read_text())
        assert report["settings"]["world_size"] == 2
        assert {s["name"]: s["rank"] for s in report["sequences"]} == {"alpha": 0, "beta": 1}


def test_sweep_refuses_a_foreign_out_folder(davis_root, tiny_weights, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    result = invoke(*run_args(davis_root, tiny_weights, out, *SEQUENCES), "--sweep", "topk=1,2")
    assert result.exit_code == 2 and "is not empty and is not a dino-vos result" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "sweep.csv").write_text("mine")  # --overwrite writes beside, never over, such files
    result = invoke(
        *run_args(davis_root, tiny_weights, out, *SEQUENCES), "--sweep", "topk=1,2", "--overwrite"
    )
    assert result.exit_code == 2 and "sweep.csv was not written by dino-vos" in result.output
    assert (out / "sweep.csv").read_text() == "mine"


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (["--sweep", "depth=1,2"], "unknown sweep parameter 'depth'"),
        (["--sweep", "topk"], "cannot read sweep 'topk'"),
        (["--sweep", "topk=5,"], "has an empty value"),
        (["--sweep", "topk=0,5"], "topk=0"),
        (["--sweep", "temperature=nan"], "not a finite number"),
        (["--sweep", "radius=-1"], "negative"),
        (["--sweep", "topk=5", "topk=10"], "given twice"),
        (["--sweep", "context=3,3"], "lists a value twice"),
        (["topk=5,10"], "NAME=V1,V2 arguments need --sweep"),
        (["--sweep", "topk=5", "--results", "res"], "--sweep propagates"),
    ],
)
def test_bad_sweep_tokens_exit_2_with_one_line(davis_root, tiny_weights, tmp_path, tokens, message):
    out = tmp_path / "out"
    result = invoke(*run_args(davis_root, tiny_weights, out), *tokens)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and not out.exists()
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output


def test_bad_sweep_tokens_load_no_torch():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom dino_vos.cli import main\n"
        "for tokens in (['--sweep', 'topk=a'], ['topk=1'], ['--sweep', 'depth=1']):\n"
        "    r = CliRunner().invoke(main, ['eval', 'davis', '--davis-root', 'x', '--out', 'o', "
        "*tokens])\n"
        "    assert r.exit_code == 2, r.output\n"
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_grid_tags_and_influence():
    grid = SweepGrid.from_values({"radius": [None, 12], "topk": [5, 10]})
    assert grid.names == ["topk", "radius"]  # canonical order, whatever the command-line order
    assert [tag(p) for p in grid.points()] == [
        "topk5-radiusnone", "topk5-radius12", "topk10-radiusnone", "topk10-radius12"
    ]  # fmt: skip
    assert split_tokens(["max-references=1,2"]) == {"max_references": ["1", "2"]}
    with pytest.raises(InputError, match="needs at least one"):
        split_tokens([])

    from dino_vos.eval.vos.sweep import SweepRow

    def row(topk: int, radius: int | None, jf: float) -> SweepRow:
        point = {"topk": topk, "radius": radius}
        return SweepRow(tag(point), point, {"J&F-Mean": jf, "J-Mean": jf, "F-Mean": jf}, 0, "x")

    rows = [row(5, None, 0.5), row(5, 12, 0.7), row(10, None, 0.6), row(10, 12, 0.6)]
    # topk: means 0.6 and 0.6 -> 0; radius: means 0.55 and 0.65 -> 0.1
    assert influence(rows, grid.names) == pytest.approx({"topk": 0.0, "radius": 0.1})
