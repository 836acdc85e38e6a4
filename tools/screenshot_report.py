"""Screenshots of a ``dino-vos report`` (one per page type) in headless Chromium.

    python tools/screenshot_report.py REPORT --out docs/images [--sequence NAME] [--frame N]
        [--view masks|diff] [--chromium /usr/bin/chromium] [--prefix report]

Writes PREFIX-overview.png, PREFIX-sequence.png and, when the report has them,
PREFIX-attention.png; prints JSON with the files and how long each page took to open.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sequence", default=None, help="sequence page to show [first]")
    parser.add_argument("--frame", type=int, default=20)
    parser.add_argument("--view", choices=["masks", "diff"], default="masks")
    parser.add_argument("--attention-frame", type=int, default=5)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--prefix", default="report")
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    index = (args.report / "index.html").resolve().as_uri()
    text = (args.report / "data" / "index.js").read_text()
    overview = json.loads(text[text.index("=") + 1 :].strip().rstrip(";"))
    args.out.mkdir(parents=True, exist_ok=True)
    shots: dict[str, dict[str, float | str]] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 800})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))

        def shoot(name: str, url: str, ready: str, setup=None) -> None:
            start = time.perf_counter()
            page.goto(url)
            page.wait_for_selector(ready)
            if setup is not None:
                setup()
            page.wait_for_load_state("load")
            page.wait_for_timeout(300)
            seconds = time.perf_counter() - start
            path = args.out / f"{args.prefix}-{name}.png"
            page.screenshot(path=str(path), full_page=True)
            shots[name] = {"file": str(path), "seconds_to_show": round(seconds, 3)}

        shoot("overview", index, "table.runs")
        sequences = overview["sequences"]
        if sequences:
            slug = next(
                (s["slug"] for s in sequences if s["name"] == args.sequence), sequences[0]["slug"]
            )
            setup = None
            if args.view == "diff":

                def setup() -> None:
                    page.check('input[name="view"][value="diff"]')

            shoot("sequence", f"{index}#seq={slug}&frame={args.frame}", "#counter", setup)
        if overview["attention"]:
            slug = overview["attention"][0]["slug"]
            shoot("attention", f"{index}#attn={slug}&frame={args.attention_frame}", ".heads img")
        browser.close()
    print(json.dumps({"shots": shots, "console_errors": errors}, indent=2))


if __name__ == "__main__":
    main()
