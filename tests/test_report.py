"""``dino-vos report``: the files it writes, the output rules, and the pages in a real browser.

The browser tests open the report from ``file://`` in headless Chromium (Debian's ``chromium``
driven by Playwright); they skip with a message when either is missing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_davis
from PIL import Image

from dino_vos.cli import main
from dino_vos.eval.davis_metrics import score_frames
from dino_vos.masks import read_mask, write_indexed_png
from dino_vos.synthetic import make_clip

CHROMIUM = Path(os.environ.get("DINO_VOS_CHROMIUM", "/usr/bin/chromium"))
#: name -> (DAVIS year, objects, frames, (H, W)), as conftest.write_davis takes them
SEQUENCES = {"alpha": (2017, 2, 9, (60, 96)), "beta": (2017, 1, 7, (60, 96))}


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def shifted_results(root: Path, out: Path, shift: int) -> Path:
    """The ground truth moved ``shift`` pixels to the right per frame index: worse and worse."""
    for name in SEQUENCES:
        (out / name).mkdir(parents=True)
        for path in sorted((root / "Annotations" / "480p" / name).glob("*.png")):
            labels = read_mask(path)
            step = shift * int(path.stem) // 2
            moved = np.zeros_like(labels)
            moved[:, step:] = labels[:, : labels.shape[1] - step]
            write_indexed_png(out / name / path.name, moved)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two scored eval davis runs (masks shifted by 1 and 3 pixels per 2 frames) of one root."""
    base = tmp_path_factory.mktemp("report-runs")
    root = write_davis(base / "davis", SEQUENCES)
    found = {"root": root}
    for label, shift in (("near", 1), ("far", 3)):
        masks = shifted_results(root, base / f"masks-{label}", shift)
        out = base / label
        extra = ["--report", base / "near-report"] if label == "near" else []
        result = invoke(
            "eval", "davis", "--davis-root", root, "--results", masks, "--out", out, *extra
        )
        assert result.exit_code == 0, result.output
        found[label] = out
        if extra:  # eval davis --report: written at the end, its path printed
            index = (base / "near-report" / "index.html").resolve()
            assert index.is_file() and f"Report: open {index.as_uri()}" in result.output
    return found


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    result = invoke("report", runs["near"], runs["far"], "--out", out, "--max-side", 64)
    assert result.exit_code == 0, result.output
    return out


def read_script(path: Path) -> dict:
    text = path.read_text()
    return json.loads(text[text.index("=") + 1 :].strip().rstrip(";"))


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def referenced_files(report: Path) -> list[Path]:
    """Every file the pages can load, from the data scripts (as report.js builds the names)."""
    overview = read_script(report / "data" / "index.js")
    files = [report / name for name in ("index.html", "report.js", "report.css")]
    files += [report / s["heatmap"] for s in overview["sweeps"] if s["heatmap"]]
    for entry in overview["sequences"] + overview["attention"]:
        data = read_script(report / "data" / "seq" / f"{entry['slug']}.js")
        files.append(report / "data" / "seq" / f"{entry['slug']}.js")
        base = report / data["base"]
        for t in range(len(data["stems"])):
            files.append(base / "frames" / f"{t:05d}.jpg")
            for name in data.get("maps", []):
                files.append(base / name / f"{t:05d}.jpg")
            if data.get("gt") and data["gt"][t]:
                files.append(base / "gt" / f"{t:05d}.png")
            for r, run in enumerate(data.get("runs", [])):
                if run and run["masks"][t]:
                    files.append(base / f"run{r}" / f"{t:05d}.png")
                if run and run["diff"][t]:
                    files.append(base / f"diff{r}" / f"{t:05d}.png")
    return files


def test_report_files_numbers_and_sizes(runs, report):
    files = referenced_files(report)
    assert all(path.is_file() for path in files), [p for p in files if not p.is_file()][:3]
    html = (report / "index.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # nothing from the network
    manifest = json.loads((report / "dino-vos.json").read_text())
    assert manifest["format"] == "dino-vos-report" and manifest["max_side"] == 64
    written = {p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file()}
    assert written == {*manifest["outputs"], "dino-vos.json"}
    for path in files:
        if path.suffix in (".jpg", ".png"):
            with Image.open(path) as image:
                assert max(image.width, image.height / max(1, _layers(path))) <= 64
    # per-frame J of the curves = the run's JSON on the scored frames, gaps elsewhere
    payload = json.loads((runs["far"] / "davis_results-val.json").read_text())
    alpha = read_script(report / "data" / "seq" / "alpha.js")
    far = alpha["runs"][1]["objects"]["2"]
    expected = next(
        o for o in payload["objects"] if o["sequence"] == "alpha" and o["object_id"] == 2
    )
    assert far["J"][0] is None and far["J"][-1] is None
    assert far["J"][1:-1] == pytest.approx(expected["J"], abs=1e-4)
    assert far["stats"]["J-Mean"] == expected["J-Mean"]


def _layers(path: Path) -> int:
    """Sprites stack one layer per object vertically."""
    return 2 if "alpha" in path.parts and path.parent.name != "frames" else 1


def test_propagate_report_with_keyframes_and_ground_truth(clip_dir, tiny_weights, tmp_path):
    masks = clip_dir / "masks"
    out, report = tmp_path / "run", tmp_path / "report"
    result = invoke(
        "propagate", clip_dir / "frames", "--mask", masks / "00000.png", "--mask",
        f"3={masks / '00003.png'}", "--weights", tiny_weights, "--short-side", 64,
        "--out", out, "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Report: open file://" in result.output
    data = read_script(report / "data" / "seq" / "frames.js")
    assert data["runs"][0]["keyframes"] == [0, 3] and not any(data["gt"])
    # a second run of the same frames is shown beside the first; with the ground truth, J and F
    # are scored at report time with the DAVIS definitions
    first_only = tmp_path / "first-only"
    result = invoke(
        "propagate", clip_dir / "frames", "--mask", masks / "00000.png", "--weights",
        tiny_weights, "--short-side", 64, "--out", first_only,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    scored = tmp_path / "scored"
    result = invoke("report", out, first_only, "--ground-truth", masks, "--out", scored)
    assert result.exit_code == 0, result.output
    data = read_script(scored / "data" / "seq" / "frames.js")
    assert [run["keyframes"] for run in data["runs"]] == [[0, 3], [0]]
    gt = np.stack([read_mask(p) for p in sorted(masks.glob("*.png"))])
    pred = np.stack([read_mask(out / p.name) for p in sorted(masks.glob("*.png"))])
    j, f = score_frames(gt, pred, int(gt.max()))
    for obj in (3, 7):
        values = data["runs"][0]["objects"][str(obj)]
        assert values["J"][0] is None and values["J"][3] is None and values["J"][5] is None
        for t in (1, 2, 4):
            assert values["J"][t] == pytest.approx(j[obj - 1, t], abs=1e-4)
            assert values["F"][t] == pytest.approx(f[obj - 1, t], abs=1e-4)


def test_output_rules(runs, report, tmp_path):
    def error(*args: object) -> str:
        result = invoke("report", *args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        return result.output

    assert "inside the input" in error(runs["near"], "--out", runs["near"] / "report")
    frames = runs["root"] / "JPEGImages" / "480p" / "alpha"
    assert "inside the input" in error(runs["near"], "--out", frames / "report")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert "not a dino-vos result" in error(runs["near"], "--out", foreign)
    assert (foreign / "notes.txt").read_text() == "keep"
    assert "not a report" in error(runs["near"], "--out", runs["far"])
    assert "not a dino-vos result" in error(foreign, "--out", tmp_path / "r")
    assert (
        "--max-side"
        in invoke("report", runs["near"], "--out", tmp_path / "r", "--max-side", 8).output
    )
    # a report folder is replaced by a new report
    again = invoke("report", runs["near"], "--out", report, "--max-side", 64)
    assert again.exit_code == 0, again.output
    overview = read_script(report / "data" / "index.js")
    assert [run["label"] for run in overview["runs"]] == ["near"]
    assert not (report / "img" / "alpha" / "run1").exists()
    invoke("report", runs["near"], runs["far"], "--out", report, "--max-side", 64)


# --- in a real browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or DINO_VOS_CHROMIUM)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    """A page that records console errors, page errors and failed requests."""
    opened = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    opened.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    opened.on("pageerror", lambda e: problems.append(str(e)))
    # ERR_ABORTED is a load the page superseded (a fast scrub changes an image's source before
    # the last one arrived); a missing file fails with ERR_FILE_NOT_FOUND and is reported
    opened.on(
        "requestfailed",
        lambda r: (
            None
            if "ERR_ABORTED" in (r.failure or "")
            else problems.append(f"failed {r.url}: {r.failure}")
        ),
    )
    opened.problems = problems
    yield opened
    opened.close()


def loaded(page, image) -> None:
    """Wait until ``image`` has decoded a picture (fails after 10 s when its file is bad)."""
    check = "img => img.complete && img.naturalWidth > 0"
    page.wait_for_function(check, arg=image.element_handle(), timeout=10_000)


def counter(page) -> int:
    return int(re.match(r"frame (\d+) /", page.inner_text("#counter")).group(1))


def test_overview_lists_the_csv_numbers_and_opens_a_sequence(runs, report, page):
    page.goto((report / "index.html").as_uri())
    for r, label in enumerate(("near", "far")):
        rows = read_csv(runs[label] / "per-sequence_results-val.csv")[1:]
        for name, j_mean, f_mean in rows:
            sequence, obj = name.rsplit("_", 1)
            row = f'tr[data-sequence="{sequence}"][data-object="{obj}"]'
            assert page.inner_text(f'{row} td[data-run="{r}"][data-stat="J-Mean"]') == j_mean
            assert page.inner_text(f'{row} td[data-run="{r}"][data-stat="F-Mean"]') == f_mean
        global_row = read_csv(runs[label] / "global_results-val.csv")
        shown = page.inner_text(f'table.runs tr[data-run="{r}"] td[data-stat="J&F"]')
        assert shown == global_row[1][0]
    # sorted by the largest change: the first row changes most
    deltas = [abs(float(t)) for t in page.locator("td.delta").all_inner_texts()]
    assert deltas == sorted(deltas, reverse=True)
    page.click('tr[data-sequence="beta"] td[data-stat="J-Mean"] >> nth=0')
    page.wait_for_selector("#counter")
    assert page.inner_text("h1") == "beta" and "seq=beta" in page.url
    assert page.problems == []


def test_sequence_page_scrub_keys_curves_and_sync(report, page):
    page.goto((report / "index.html").as_uri() + "#seq=alpha&frame=2")
    page.wait_for_selector("#counter")
    assert counter(page) == 2
    frames = page.locator(".panel img.frame")
    assert frames.count() == 3  # ground truth, near, far
    before = frames.nth(1).get_attribute("src")
    page.keyboard.press("ArrowRight")
    assert counter(page) == 3 and "frame=3" in page.url
    assert frames.nth(1).get_attribute("src") != before
    # every panel shows the same frame, and each run its own mask of that frame
    sources = {frames.nth(i).get_attribute("src") for i in range(3)}
    assert sources == {"img/alpha/frames/00003.jpg"}
    layers = [
        page.locator(f'.panel[data-run="{r}"] .layer').first.evaluate(
            "e => e.style.backgroundImage"
        )
        for r in (0, 1)
    ]
    assert "run0/00003.png" in layers[0] and "run1/00003.png" in layers[1]
    # a click on the J curve at frame 6 jumps there
    curve = page.locator("#chart-J svg")
    box = curve.bounding_box()
    count = 9
    page.mouse.click(box["x"] + box["width"] * 6 / (count - 1), box["y"] + box["height"] / 2)
    assert counter(page) == 6
    assert page.locator("#slider").input_value() == "6"
    # difference view and object toggles
    page.check('input[name="view"][value="diff"]')
    layer = page.locator('.panel[data-run="1"] .layer[data-object="2"]')
    assert "diff1/00006.png" in layer.evaluate("e => e.style.backgroundImage")
    page.uncheck('input[type="checkbox"][data-object="2"]')
    assert "hidden" in layer.get_attribute("class")
    page.keyboard.press("End")
    assert counter(page) == count - 1
    page.goto((report / "index.html").as_uri())
    page.wait_for_selector("table.objects-table")
    assert page.problems == []


@pytest.fixture(scope="module")
def attention_report(clip_dir, tiny_weights, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("attention")
    result = invoke(
        "attention", clip_dir / "frames", "--weights", tiny_weights, "--short-side", 64,
        "--out", base / "attn",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke("report", base / "attn", "--out", base / "report")
    assert result.exit_code == 0, result.output
    return base / "report"


def test_attention_heads_are_scrubbable(attention_report, page):
    assert all(path.is_file() for path in referenced_files(attention_report))
    page.goto(attention_report.as_uri() + "/index.html")
    page.click("a.attention-link")
    page.wait_for_selector(".heads figure")
    maps = page.locator(".heads figure").evaluate_all("fs => fs.map(f => f.dataset.map)")
    assert maps == ["frame", "mean", "head0", "head1", "head2"]
    head = page.locator('.heads figure[data-map="head1"] img')
    assert head.get_attribute("src").endswith("head1/00000.jpg")
    page.keyboard.press("ArrowRight")
    assert counter(page) == 1 and head.get_attribute("src").endswith("head1/00001.jpg")
    loaded(page, head)
    assert page.problems == []
    shutil.rmtree(attention_report)


def test_eval_davis_sweep_report(runs, tiny_weights, tmp_path, page):
    out, report = tmp_path / "sweep", tmp_path / "report"
    result = invoke(
        "eval", "davis", "--davis-root", runs["root"], "--weights", tiny_weights,
        "--short-side", 64, "--out", out, "--sweep", "topk=1,2", "context=1,2",
        "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Report: open {(report / 'index.html').resolve().as_uri()}" in result.output
    assert all(path.is_file() for path in referenced_files(report))
    page.goto((report / "index.html").as_uri())
    table = page.locator(".sweep-section table tbody tr")
    assert table.count() == 4
    rows = read_csv(out / "sweep.csv")
    best = max(rows[1:], key=lambda row: float(row[rows[0].index("J&F-Mean")]))
    assert table.first.inner_text().split("\t")[:3] == [best[0], best[1], best[2]]
    heatmap = page.locator(".sweep-section img")
    loaded(page, heatmap)
    assert page.problems == []
    # a setting of the sweep is an eval davis run of its own
    setting = next((out / "settings").iterdir())
    result = invoke("report", setting, "--out", tmp_path / "setting-report", "--max-side", 64)
    assert result.exit_code == 0, result.output


def test_youtube_vos_output_is_a_run(tiny_weights, tmp_path):
    split = tmp_path / "ytvos" / "valid"
    clip = make_clip(6, (48, 80), num_objects=2, seed=4)
    names = [f"{5 * t:05d}" for t in range(6)]
    (split / "JPEGImages" / "vid").mkdir(parents=True)
    (split / "Annotations" / "vid").mkdir(parents=True)
    for name, image in zip(names, clip.frames, strict=True):
        cv2.imwrite(str(split / "JPEGImages" / "vid" / f"{name}.jpg"), image[..., ::-1])
    first = np.where(clip.masks[0] == 1, 1, 0).astype(np.uint8)  # object 2 enters at frame 2
    second = np.where(clip.masks[2] == 2, 2, 0).astype(np.uint8)
    write_indexed_png(split / "Annotations" / "vid" / "00000.png", first)
    write_indexed_png(split / "Annotations" / "vid" / "00010.png", second)
    objects = {"1": {"frames": names}, "2": {"frames": names[2:]}}
    (split / "meta.json").write_text(json.dumps({"videos": {"vid": {"objects": objects}}}))
    out, report = tmp_path / "out", tmp_path / "report"
    result = invoke(
        "eval", "youtube-vos", "--root", split.parent, "--out", out, "--weights", tiny_weights,
        "--short-side", 48,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke("report", out, "--out", report)
    assert result.exit_code == 0, result.output
    overview = read_script(report / "data" / "index.js")
    assert [s["name"] for s in overview["sequences"]] == ["vid"] and overview["rows"] == []
    data = read_script(report / "data" / "seq" / "vid.js")
    assert data["stems"] == names and data["runs"][0]["keyframes"] == [0, 2]
    assert [o["id"] for o in data["objects"]] == [1, 2]
    assert all(path.is_file() for path in referenced_files(report))
