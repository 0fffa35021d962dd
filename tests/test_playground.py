"""The playground page in a real headless browser (Debian's chromium driven by playwright)."""

import os
import re
from pathlib import Path

import pytest
from assets.make_demo_adapter import PIRATE as PIRATE_ANSWERS
from assets.make_demo_model import ANSWERS
from conftest import DEMO
from server_util import running

import diffgemma
from diffgemma.server import ServerOptions, create_app

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

RECORD_DRAFTS = """
() => {
  window.__drafts = [];
  new MutationObserver(() => {
    const text = document.getElementById('canvas').textContent;
    if (text && window.__drafts[window.__drafts.length - 1] !== text) window.__drafts.push(text);
  }).observe(document.getElementById('canvas'), {childList: true, subtree: true, characterData: true});
}
"""

RECORD_STATS = """
() => {
  window.__stats = [];
  new MutationObserver(() => window.__stats.push(document.getElementById('stats').textContent))
    .observe(document.getElementById('stats'), {childList: true, subtree: true, characterData: true});
}
"""


def browser_driver():
    """playwright's `sync_playwright`, where Debian's chromium is here to drive (CI must have it)."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium for the browser test")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api").sync_playwright


def test_playground_generates_and_edits(demo, tmp_path):
    sync_playwright = browser_driver()
    question = "Why is the sky blue?"
    app = create_app(demo, ServerOptions(model_name="demo"))
    with running(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url + "/")
            page.fill("#prompt", question)
            page.fill("#seed", "1")
            page.evaluate(RECORD_DRAFTS)
            page.click("#generate")
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            drafts = page.evaluate("window.__drafts")
            result = page.input_value("#result")
            # Every draft the stream carries is drawn; how many of them the observer sees apart depends on how
            # the stream's bytes were split into reads (one read can carry several drafts), so the count of
            # drawn steps comes from the page's own statistics line.
            stats = page.inner_text("#stats")
            drawn = re.search(r"in (\d+) steps", stats)
            assert drafts and drawn and int(drawn.group(1)) >= 2, (stats, drafts)
            assert result == ANSWERS[question]
            assert "tokens/s" in stats

            start, end = result.index("blue"), result.index("blue") + len("blue")
            select = "([a, b]) => { const box = document.getElementById('result'); box.setSelectionRange(a, b); }"
            page.evaluate(select, [start, end])
            page.click("#regenerate")
            page.wait_for_selector("body[data-edited=yes]", timeout=60_000)
            edited = page.input_value("#result")
            assert edited.startswith(result[:start]) and edited.endswith(result[end:])
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
            if os.environ.get("DIFFGEMMA_SCREENSHOT"):
                page.screenshot(path=os.environ["DIFFGEMMA_SCREENSHOT"], full_page=True)
            assert (tmp_path / "playground.png").stat().st_size > 10_000
        finally:
            browser.close()


def test_playground_sends_a_picture(tmp_path):
    """A picked picture goes with the prompt as an image_url part; a model with a vision tower answers it, one
    without says why on the page."""
    sync_playwright = browser_driver()
    import numpy as np
    from PIL import Image

    from diffgemma.presets import random_checkpoint

    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(picture)
    seer = diffgemma.load(random_checkpoint(tmp_path / "seer", "tiny-vision", seed=1))
    blind = diffgemma.load(DEMO)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            for model, state in ((seer, "done"), (blind, "failed")):
                with running(create_app(model, ServerOptions(model_name="m", max_tokens=16))) as url:
                    page = browser.new_page()
                    sent = []
                    page.on("request", lambda request, sent=sent: sent.append(request.post_data or ""))
                    page.goto(url + "/")
                    page.fill("#maxTokens", "8")
                    page.set_input_files("#picture", str(picture))
                    page.click("#generate")
                    page.wait_for_selector(f"body[data-state={state}]", timeout=60_000)
                    assert any('"image_url"' in body and "data:image/png;base64," in body for body in sent)
                    if state == "failed":
                        assert "not images" in page.inner_text("#stats")
        finally:
            browser.close()


def test_playground_asks_the_model_picked(tmp_path):
    """With LoRA adapters served beside the model, the page offers each by name and asks the one picked."""
    sync_playwright = browser_driver()
    model = diffgemma.load(DEMO)
    model.add_adapter("pirate", DEMO.parent / "demo-pirate")
    with running(create_app(model, ServerOptions(model_name="demo"))) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("body[data-models='2']", timeout=30_000)
            assert page.is_visible("#model")
            page.fill("#prompt", "Name a fruit.")
            page.fill("#seed", "0")
            page.select_option("#model", "pirate")
            page.click("#generate")
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            assert page.input_value("#result") == PIRATE_ANSWERS["Name a fruit."]
        finally:
            browser.close()


def test_playground_thinks_within_a_budget(demo):
    """Thinking on, with a thought budget: the page asks for both, shows the thought apart, the answer in the
    result; the demo's thought ends after the budget's tokens (its tokens are bytes)."""
    from assets.make_demo_model import THINKING

    sync_playwright = browser_driver()
    question = "What is 3 + 4?"
    with running(create_app(demo, ServerOptions(model_name="demo"))) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            for budget, thought in (("", THINKING[question][0]), ("10", THINKING[question][0][:10])):
                page.fill("#prompt", question)
                page.fill("#seed", "0")
                page.check("#think")
                page.fill("#budget", budget)
                page.click("#generate")
                page.wait_for_selector("body[data-state=done]", timeout=60_000)
                assert page.is_visible("#thinking") and page.inner_text("#thinking") == thought
                assert page.input_value("#result")
                page.evaluate("document.body.dataset.state = 'running'")
        finally:
            browser.close()


def test_playground_sends_the_sampler_settings_filled_in(demo):
    """The sampler settings drawer shows the server's defaults as placeholders (from /props) and sends only what
    is filled in, as numbers: here a hot schedule (the demo then takes ten steps or more a canvas) held to three
    steps a canvas, and a frequency penalty."""
    sync_playwright = browser_driver()
    with running(create_app(demo, ServerOptions(model_name="demo"))) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            steps = page.locator("#max_denoising_steps")
            page.wait_for_function("document.getElementById('max_denoising_steps').placeholder !== ''")
            assert steps.get_attribute("placeholder") == str(demo.settings.max_denoising_steps)
            assert page.get_attribute("#t_max", "placeholder") == str(demo.settings.t_max)
            page.click("#sampler summary")
            page.fill("#prompt", "Why is the sky blue?")
            for name, value in (
                ("max_denoising_steps", "3"),
                ("t_max", "3"),
                ("t_min", "2"),
                ("frequency_penalty", "0.5"),
            ):
                page.fill(f"#{name}", value)
            page.evaluate(RECORD_STATS)
            with page.expect_request("**/v1/chat/completions") as asked:
                page.click("#generate")
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            sent = asked.value.post_data_json
            assert [sent[name] for name in ("max_denoising_steps", "t_max", "t_min", "frequency_penalty")] == [
                3,
                3,
                2,
                0.5,
            ]
            assert not {"entropy_bound", "top_p", "presence_penalty", "repetition_penalty"} & set(sent)
            shown = [int(step) for line in page.evaluate("window.__stats") for step in re.findall(r"step (\d+)", line)]
            assert shown and max(shown) <= 3, shown  # (the statistics line names each drawn step)
        finally:
            browser.close()
