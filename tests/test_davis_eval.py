"""DAVIS evaluation end to end: dataset reader, runner, resume after a kill, --results, errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DAVIS_SEQUENCES as SEQUENCES
from conftest import SHARED_DATA, requires_shared_data, write_davis
from conftest import davis_args as run_args
from PIL import Image

from dino_vos.cli import main
from dino_vos.eval.davis_metrics import GLOBAL_COLUMNS, score_frames
from dino_vos.eval.vos.davis_data import DavisDataset, read_split_file
from dino_vos.eval.vos.davis_sequences import merge_results, shard_sequences
from dino_vos.masks import read_mask, write_indexed_png
from dino_vos.writers import MANIFEST_NAME, STAGING_NAME


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    return write_davis(tmp_path_factory.mktemp("davis"))


def invoke(*args: object) -> object:
    result = CliRunner().invoke(main, ["eval", "davis", *map(str, args)])
    return result


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def object_means(out: Path, split: str = "val") -> dict[str, float]:
    """``{"<seq>_<id> J": J-Mean, "<seq>_<id> F": F-Mean}`` from a run's JSON."""
    data = json.loads((out / f"davis_results-{split}.json").read_text())
    means = {}
    for obj in data["objects"]:
        name = f"{obj['sequence']}_{obj['object_id']}"
        means[f"{name} J"], means[f"{name} F"] = obj["J-Mean"], obj["F-Mean"]
    return means


# --- dataset reader ----------------------------------------------------------------------------


def test_reader_split_override_and_folder_fallback(davis_root, tmp_path):
    dataset = DavisDataset(davis_root)
    assert dataset.names == ["alpha", "beta", "gamma"]
    assert dataset.split_file == davis_root / "ImageSets" / "2017" / "val.txt"
    beta = dataset.sequences[1]
    assert beta.num_objects() == 1 and set(np.unique(beta.read_annotations())) <= {0, 1}
    assert dataset.sequences[0].num_objects() == 2
    assert beta.scored_stems == [f"{t:05d}" for t in range(1, 6)]
    assert DavisDataset(davis_root, sequences=["gamma", "alpha"]).names == ["gamma", "alpha"]
    no_split = shutil.copytree(
        davis_root, tmp_path / "copy", ignore=shutil.ignore_patterns("*.txt")
    )
    assert DavisDataset(no_split).split_file is None
    assert DavisDataset(no_split).names == ["alpha", "beta", "gamma"]
    assert len(DavisDataset(davis_root, max_frames=5).sequences[2].annotations) == 5


def test_split_file_with_davis2016_frame_paths(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text(
        "/JPEGImages/480p/bear/00000.jpg /Annotations/480p/bear/00000.png\n"
        "/JPEGImages/480p/bear/00001.jpg /Annotations/480p/bear/00001.png\n"
        "\n/JPEGImages/480p/cows/00000.jpg /Annotations/480p/cows/00000.png\n"
    )
    assert read_split_file(path) == ["bear", "cows"]


def test_shards_balance_frames_and_merge_in_order(davis_root):
    sequences = DavisDataset(davis_root).sequences
    shards = [shard_sequences(sequences, rank, 2) for rank in range(2)]
    assert [s.name for s in shards[0]] == ["gamma"]  # the longest alone
    assert [s.name for s in shards[1]] == ["alpha", "beta"]
    assert sorted(s.name for shard in shards for s in shard) == ["alpha", "beta", "gamma"]

    class Result:
        def __init__(self, name):
            self.name = name

    merged = merge_results(
        [[Result("gamma")], [Result("alpha"), Result("beta")]], ["alpha", "beta", "gamma"]
    )
    assert [r.name for r in merged] == ["alpha", "beta", "gamma"]
    with pytest.raises(RuntimeError, match="no scores"):
        merge_results([[Result("alpha")]], ["alpha", "beta"])
    with pytest.raises(RuntimeError, match="two ranks"):
        merge_results([[Result("alpha")], [Result("alpha")]], ["alpha"])


# --- --results mode ------------------------------------------------------------------------------


def test_results_mode_scores_prepared_masks(davis_root, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(davis_root / "Annotations" / "480p", results)
    for path in (results / "alpha").glob("*.png"):  # object 2 missing: scored as empty
        labels = read_mask(path)
        write_indexed_png(path, np.where(labels == 2, 0, labels))
    gamma_gt = np.stack([read_mask(p) for p in sorted((results / "gamma").glob("*.png"))])
    shifted = np.zeros_like(gamma_gt)
    shifted[:, :, 1:] = gamma_gt[:, :, :-1]  # one pixel to the right
    for t, labels in enumerate(shifted):
        write_indexed_png(results / "gamma" / f"{t:05d}.png", labels)

    result = invoke("--davis-root", davis_root, "--results", results)
    assert result.exit_code == 0, result.output
    rows = read_csv(results / "per-sequence_results-val.csv")
    assert rows[0] == ["Sequence", "J-Mean", "F-Mean"]
    names = [row[0] for row in rows[1:]]
    assert names == ["alpha_1", "alpha_2", "beta_1", "gamma_1", "gamma_2", "gamma_3"]
    values = {row[0]: row[1:] for row in rows[1:]}
    assert values["alpha_1"] == ["1.000", "1.000"] and values["beta_1"] == ["1.000", "1.000"]
    assert values["alpha_2"] == ["0.000", "0.000"]
    j, f = score_frames(gamma_gt[1:-1], shifted[1:-1], 3)
    means = object_means(results)
    for k in range(3):
        assert means[f"gamma_{k + 1} J"] == pytest.approx(j[k].mean(), abs=1e-12)
        assert means[f"gamma_{k + 1} F"] == pytest.approx(f[k].mean(), abs=1e-12)
        # a 1-pixel shift lowers J; boundaries stay within the 2-pixel tolerance
        assert 0.5 < j[k].mean() < 1 and f[k].mean() > 0.9
        assert values[f"gamma_{k + 1}"] == [f"{j[k].mean():.3f}", f"{f[k].mean():.3f}"]
    header, numbers = read_csv(results / "global_results-val.csv")
    assert header == list(GLOBAL_COLUMNS)
    assert all(len(v.split(".")[1]) == 3 for v in numbers)
    j_mean = np.mean([v for k, v in means.items() if k.endswith("J")])
    f_mean = np.mean([v for k, v in means.items() if k.endswith("F")])
    assert float(numbers[0]) == pytest.approx((j_mean + f_mean) / 2, abs=5e-4)
    with Image.open(results / "per-sequence_results-val.png") as plot:
        assert plot.format == "PNG" and plot.width > 200


# --- malformed inputs -----------------------------------------------------------------------------


def broken_copy(davis_root: Path, tmp_path: Path) -> Path:
    return shutil.copytree(davis_root, tmp_path / "broken")


def assert_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output


def test_error_missing_frames(davis_root, tmp_path, tiny_weights):
    root = broken_copy(davis_root, tmp_path)
    (root / "JPEGImages" / "480p" / "alpha" / "00003.jpg").unlink()
    result = invoke(*run_args(root, tiny_weights, tmp_path / "out"))
    assert_error(result, "alpha is missing frames", "00003")


def test_error_missing_annotation_folder(davis_root, tmp_path, tiny_weights):
    root = broken_copy(davis_root, tmp_path)
    shutil.rmtree(root / "Annotations" / "480p" / "beta")
    assert_error(
        invoke(*run_args(root, tiny_weights, tmp_path / "o")), "no annotation folder", "beta"
    )
    shutil.rmtree(root / "Annotations")
    assert_error(
        invoke(*run_args(root, tiny_weights, tmp_path / "o")), "Annotations/480p not found"
    )


def test_error_unknown_split_and_resolution(davis_root, tmp_path, tiny_weights):
    result = invoke(*run_args(davis_root, tiny_weights, tmp_path / "o"), "--split", "test")
    assert_error(result, "unknown split 'test'", "2017/val")
    result = invoke(*run_args(davis_root, tiny_weights, tmp_path / "o"), "--resolution", "1080p")
    assert_error(result, "1080p not found", "resolutions found: 480p")
    result = invoke(*run_args(davis_root, tiny_weights, tmp_path / "o"), "--sequences", "nope")
    assert_error(result, "nope")


def test_error_size_mismatch(davis_root, tmp_path, tiny_weights):
    root = broken_copy(davis_root, tmp_path)
    first = root / "Annotations" / "480p" / "alpha" / "00000.png"
    write_indexed_png(
        first, cv2.resize(read_mask(first), (40, 24), interpolation=cv2.INTER_NEAREST)
    )
    assert_error(invoke(*run_args(root, tiny_weights, tmp_path / "o")), "is 40x24", "is 80x48")
    results = shutil.copytree(davis_root / "Annotations" / "480p", tmp_path / "results")
    path = results / "beta" / "00002.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
    result = invoke("--davis-root", davis_root, "--results", results)
    assert_error(result, "00002.png is 10x10", "result masks of beta are 80x48")
    for path in (results / "beta").glob("*.png"):
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
    assert_error(invoke("--davis-root", davis_root, "--results", results), "annotation size")


def test_error_results_unknown_id_or_missing_mask(davis_root, tmp_path):
    results = shutil.copytree(davis_root / "Annotations" / "480p", tmp_path / "results")
    labels = read_mask(results / "alpha" / "00004.png")
    labels[:4, :4] = 5
    write_indexed_png(results / "alpha" / "00004.png", labels)
    result = invoke("--davis-root", davis_root, "--results", results)
    assert_error(result, "00004.png has object id(s) 5", "not in the ground truth", "1..2")
    (results / "beta" / "00003.png").unlink()
    result = invoke("--davis-root", davis_root, "--results", results, "--sequences", "beta")
    assert_error(result, "results for beta are incomplete", "00003.png")


def test_error_conflicting_modes(davis_root, tmp_path, tiny_weights):
    result = invoke("--davis-root", davis_root, "--results", tmp_path, "--weights", tiny_weights)
    assert_error(result, "drop --weights")
    assert_error(invoke("--davis-root", davis_root), "give --out DIR")


# --- propagation runs: cache, resume after a kill, workers, torchrun -----------------------------


@pytest.fixture(scope="module")
def reference_run(davis_root, tiny_weights, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run with a cold feature cache."""
    base = tmp_path_factory.mktemp("runs")
    first, cache = base / "first", base / "cache"
    result = invoke(*run_args(davis_root, tiny_weights, first), "--cache", cache)
    assert result.exit_code == 0, result.output
    return {"first": first, "cache": cache, "base": base}


def test_run_outputs_and_skip_complete_sequences(davis_root, tiny_weights, reference_run, tmp_path):
    plain = shutil.copytree(reference_run["first"], tmp_path / "plain")
    data = json.loads((plain / "davis_results-val.json").read_text())
    assert [s["status"] for s in data["sequences"]] == ["propagated"] * 3
    assert data["timing"]["propagated_frames"] == 8 + 7 + 40
    assert data["settings"]["propagation"]["topk"] == 5 and data["settings"]["backbone"] == "tiny"
    for name, (_, _, frames, _) in SEQUENCES.items():
        assert len(list((plain / name).glob("*.png"))) == frames
        assert (plain / name / MANIFEST_NAME).is_file()
    assert read_csv(plain / "global_results-val.csv")[0] == list(GLOBAL_COLUMNS)
    before = (plain / "global_results-val.csv").read_text()
    cache = ("--cache", reference_run["cache"])
    result = invoke(*run_args(davis_root, tiny_weights, plain), *cache)  # nothing to propagate
    assert result.exit_code == 0, result.output
    again = json.loads((plain / "davis_results-val.json").read_text())
    assert [s["status"] for s in again["sequences"]] == ["skipped"] * 3
    assert (plain / "global_results-val.csv").read_text() == before
    # other propagation parameters: the complete outputs are not reused
    result = invoke(
        *run_args(davis_root, tiny_weights, plain), *cache, "--topk", 3, "--sequences", "beta"
    )
    assert result.exit_code == 0, result.output
    beta = json.loads((plain / "davis_results-val.json").read_text())["sequences"]
    assert beta[0]["status"] == "propagated"
    assert json.loads((plain / "beta" / MANIFEST_NAME).read_text())["propagation"]["topk"] == 3


def test_cache_second_run_skips_backbone(davis_root, tiny_weights, reference_run):
    cache = reference_run["cache"]
    first = json.loads((reference_run["first"] / "davis_results-val.json").read_text())
    assert first["cache"] == {"hits": 0, "misses": 55, "hit_rate": 0.0}
    files = list(cache.rglob("*.safetensors"))
    assert len(files) == 55 and len(list(cache.glob("*/cache-key.json"))) == 1
    other = reference_run["base"] / "topk3"
    result = invoke(*run_args(davis_root, tiny_weights, other), "--cache", cache, "--topk", 3)
    assert result.exit_code == 0, result.output
    second = json.loads((other / "davis_results-val.json").read_text())
    assert second["cache"] == {"hits": 55, "misses": 0, "hit_rate": 1.0}
    assert json.loads((other / "gamma" / MANIFEST_NAME).read_text())["propagation"]["topk"] == 3


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "dino_vos", "eval", "davis", *map(str, args)]


@pytest.mark.slow
def test_kill_mid_run_then_resume_with_workers(davis_root, tiny_weights, reference_run):
    out = reference_run["base"] / "killed"
    staging = out / "gamma" / STAGING_NAME
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        _cli(*run_args(davis_root, tiny_weights, out)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if staging.is_dir() and any(staging.glob("*.png")):
                break
            time.sleep(0.005)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert (out / "alpha" / MANIFEST_NAME).is_file() and (out / "beta" / MANIFEST_NAME).is_file()
    assert not (out / "gamma" / MANIFEST_NAME).exists()  # half-written: not taken as complete
    assert not (out / "global_results-val.csv").exists()

    resumed = subprocess.run(
        _cli(*run_args(davis_root, tiny_weights, out), "--workers", 2),
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr
    data = json.loads((out / "davis_results-val.json").read_text())
    assert [s["status"] for s in data["sequences"]] == ["skipped", "skipped", "propagated"]
    assert not staging.exists()
    assert len(list((out / "gamma").glob("*.png"))) == 40
    # no cache here (fp32 features): equal to the fp16-cached reference up to rounding
    assert object_means(out) == pytest.approx(object_means(reference_run["first"]), abs=0.02)
    rows = read_csv(out / "per-sequence_results-val.csv")[1:]
    assert [r[0] for r in rows] == ["alpha_1", "alpha_2", "beta_1", "gamma_1", "gamma_2", "gamma_3"]


@pytest.mark.slow
def test_torchrun_shards_and_rank0_merges(davis_root, tiny_weights, reference_run):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not found next to the Python interpreter")
    out = reference_run["base"] / "torchrun"
    command = [
        str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
        "-m", "dino_vos", "eval", "davis",
        *map(str, run_args(davis_root, tiny_weights, out, "--cache", reference_run["cache"])),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((out / "davis_results-val.json").read_text())
    assert data["settings"]["world_size"] == 2
    assert {s["name"]: s["rank"] for s in data["sequences"]} == {"alpha": 1, "beta": 1, "gamma": 0}
    assert data["cache"]["hits"] == 55
    assert object_means(out) == pytest.approx(object_means(reference_run["first"]), abs=1e-3)


# --- real data ------------------------------------------------------------------------------------


@pytest.mark.realdata
@requires_shared_data("davis2016-val-dev")
def test_real_ground_truth_against_itself_and_shifted(tmp_path):
    root = SHARED_DATA / "davis2016-val-dev"
    annotations = root / "Annotations" / "480p"
    result = invoke("--davis-root", root, "--results", annotations, "--out", tmp_path / "self")
    assert result.exit_code == 0, result.output
    assert read_csv(tmp_path / "self" / "global_results-val.csv")[1][:7] == [
        "1.000", "1.000", "1.000", "0.000", "1.000", "1.000", "0.000"
    ]  # fmt: skip
    objects = 0
    for sequence in DavisDataset(root, require_frames=False):
        gt = sequence.read_annotations()
        shifted = np.zeros_like(gt)
        shifted[:, :, 1:] = gt[:, :, :-1]  # one pixel to the right
        j, f = score_frames(gt, shifted, sequence.num_objects())
        objects += len(j)
        for j_mean, f_mean in zip(j.mean(axis=1), f.mean(axis=1), strict=True):
            # boundaries move by 1 px (tolerance 8 px): F stays near 1; J drops, most for
            # thin structures (paraglider lines: about 0.6)
            assert 0.5 < j_mean < 1.0 and f_mean > 0.99 and j_mean < f_mean
    assert objects == 10


def test_keyframes_simulate_corrections_reported_apart(davis_root, tiny_weights, reference_run):
    out = reference_run["base"] / "keyframes"
    cache = ("--cache", reference_run["cache"])
    result = invoke(*run_args(davis_root, tiny_weights, out), *cache, "--keyframes", "every:4")
    assert result.exit_code == 0, result.output
    assert "not the standard protocol" in result.output
    assert not (out / "davis_results-val.json").exists()  # never under the standard names
    data = json.loads((out / "davis_results-val-keyframes-every4.json").read_text())
    assert "simulated corrections" in data["settings"]["protocol"]
    for name, (_, objects, frames, _) in SEQUENCES.items():
        manifest = json.loads((out / name / MANIFEST_NAME).read_text())
        assert manifest["keyframes"] == [f"{t:05d}" for t in range(0, frames, 4)]
        sequence = DavisDataset(davis_root, "val").sequences[list(SEQUENCES).index(name)]
        gt = sequence.read_annotations(sequence.stems)
        pred = np.stack([read_mask(out / name / f"{s}.png") for s in sequence.stems])
        for t in range(0, frames, 4):  # a keyframe's output is its ground truth, exactly
            assert np.array_equal(pred[t], gt[t])
        scored = [t for t in range(1, frames - 1) if t % 4]  # keyframes are not scored
        j, f = score_frames(gt[scored], pred[scored], objects)
        reported = [o for o in data["objects"] if o["sequence"] == name]
        assert [o["J-Mean"] for o in reported] == pytest.approx(np.nanmean(j, axis=1).tolist())
    standard = json.loads((reference_run["first"] / "davis_results-val.json").read_text())
    assert data["global"]["J&F-Mean"] > standard["global"]["J&F-Mean"]  # corrections help
    both = invoke(
        *run_args(davis_root, tiny_weights, out), *cache, "--keyframes", "every:4",
        "--direction", "both", "--sequences", "gamma",
    )  # fmt: skip
    assert both.exit_code == 0, both.output
    assert (out / "davis_results-val-keyframes-every4-both.json").is_file()
    assert json.loads((out / "gamma" / MANIFEST_NAME).read_text())["direction"] == "both"
    for bad, message in (("every:0", "cannot read keyframes 'every:0'"), ("1,x", "every:N")):
        result = invoke(*run_args(davis_root, tiny_weights, out), "--keyframes", bad)
        assert result.exit_code == 2 and message in result.output, result.output
