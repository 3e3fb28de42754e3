"""report.html and curves.png at the end of a run, finished or stopped: the curves, every validation video, the
facts, and nothing fetched from elsewhere."""

from __future__ import annotations

import json
import logging
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cogft.training.loop import train
from cogft.training.stop import StopRequest


class Page(HTMLParser):
    """What a browser would load and draw: tags seen, video sources, curves (name -> point count), every URL."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.videos, self.curves, self.urls, self.text = set(), [], {}, [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.urls += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag == "video":
            self.videos.append(attrs["src"])
        if tag == "polyline":
            self.curves[attrs["data-series"]] = len(attrs["points"].split())

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_cache):
    """3 LoRA steps, 2 validation prompts rendered at steps 2 and 3 (the end)."""
    from cogft.config_file import load_config

    out = tmp_path_factory.mktemp("report") / "run"
    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "configs" / "tiny-lora.yaml", [
        f"data.path={root / 'data'}", f"data.cache_dir={shared_cache}", f"output_dir={out}",
        "tracking.report_to=none", "train.max_steps=3", "train.checkpoint_every=100", "validation.every=2",
        "validation.num_inference_steps=2"])
    return train(config)


def test_the_report_shows_both_curves_every_video_and_the_facts(finished):
    run = finished
    page = Page((run / "report.html").read_text())
    rows = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert page.curves == {"loss": len(rows), "loss_smoothed": len(rows), "lr": len(rows),
                           "quality/motion_ratio": 2} and len(rows) == 3  # the motion guard at each validation
    videos = sorted((run / "samples").glob("*.mp4"))
    assert len(videos) == 4  # 2 prompts x (step 2, step 3)
    base = sorted((run / "samples" / "base").glob("*.mp4"))  # the motion guard's renders with the adapter off
    assert len(base) == 2 and sorted(page.videos) == sorted([f"samples/{v.name}" for v in videos] +
                                                            [f"samples/base/{v.name}" for v in base])
    assert all((run / src).is_file() for src in page.videos)  # relative to the report: the folder can move
    text = " ".join(page.text)
    best = min(row["loss_smoothed"] for row in rows)
    assert "tiny://2b" in text and "3 of 3" in text and f"best {best:.4f}" in text
    assert "a red square bouncing across a blue background" in text  # videos captioned with their prompts
    assert "lora/" in page.urls
    assert not {"script", "link", "iframe", "img"} & page.tags  # nothing loaded from elsewhere
    assert all("://" not in url and not url.startswith("/") for url in page.urls)


def test_curves_png_is_a_real_image_of_both_curves(finished):
    from PIL import Image

    with Image.open(finished / "curves.png") as image:  # loss, learning rate and (validated LoRA) motion ratio
        assert image.format == "PNG" and image.size == (720, 780)
        colours = {colour for _, colour in image.convert("RGB").getcolors(720 * 780)}
    # the smoothed loss and the learning rate are drawn in their colours, not only the axes and labels
    assert (0x1F, 0x4E, 0x9C) in colours and (0xC0, 0x5A, 0x1C) in colours


def test_a_stopped_run_gets_its_report_and_the_summary_names_it(make_config, caplog, monkeypatch):
    """A run stopped by Ctrl-C (during its first step here) gets its report too, naming the checkpoint's weights."""

    class CtrlCAtOnce(StopRequest):
        def __enter__(self):
            super().__enter__()
            self.requested = True
            return self

    monkeypatch.setattr("cogft.training.loop.StopRequest", CtrlCAtOnce)
    with caplog.at_level(logging.INFO, logger="cogft.training.loop"):
        run = train(make_config("validation.prompts=[]", "train.max_steps=5"))
    said = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped:"))
    assert f"report: {run / 'report.html'}" in said
    page = Page((run / "report.html").read_text())
    text = " ".join(page.text)
    assert "1 of 5 (stopped early)" in text and "No validation videos" in text and not page.videos
    assert "checkpoints/step-000001/" in page.urls
    assert page.curves == {"loss": 2, "loss_smoothed": 2, "lr": 2}  # one step: drawn as a dot


def test_the_held_out_eval_curve_is_shown_when_the_run_has_one(make_config, tmp_path):
    from PIL import Image

    from cogft.training.report import write_run_report

    config = make_config(out="eval-run")
    run = Path(config.output_dir)
    run.mkdir(parents=True)
    steps = [{"step": s, "loss": 1.0 / s, "loss_smoothed": 1.0 / s, "lr": 1e-3} for s in (1, 2, 3, 4)]
    evals = [{"step": s, "eval/loss": 0.5 / s, "eval/loss_base": 0.6, "eval/lora_gain": 0.6 - 0.5 / s} for s in (2, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in steps + evals))
    page = Page(write_run_report(config, run, stopped=False).read_text())
    assert page.curves == {"loss": 4, "loss_smoothed": 4, "lr": 4, "eval/loss": 2, "eval/loss_base": 2}
    assert "Held-out eval loss" in "".join(page.text)
    with Image.open(run / "curves.png") as image:
        assert image.size == (720, 3 * 260)  # the two charts and the eval one, stacked
