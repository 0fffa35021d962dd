import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reference import load_reference, make_reference_checkpoint
from server_util import running

import diffgemma
from diffgemma.server import ServerOptions, create_app

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference")
    return {name: make_reference_checkpoint(root / name, name, seed=i) for i, name in enumerate("ABC")}


@pytest.fixture(scope="session")
def reference_models(reference_checkpoints):
    return {name: load_reference(path) for name, path in reference_checkpoints.items()}


@pytest.fixture(scope="session")
def ours(reference_checkpoints):
    return {name: diffgemma.load(path) for name, path in reference_checkpoints.items()}


@pytest.fixture(scope="session")
def generation_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Gentler weights than the logits tests: over many denoising steps, self-conditioning feeds each
    step's distribution into the next, and large random weights turn float32 rounding into chaos."""
    root = tmp_path_factory.mktemp("generation")
    return {name: make_reference_checkpoint(root / name, name, seed=1, scale=0.5) for name in "ABC"}


@pytest.fixture(scope="session")
def generation_pairs(generation_checkpoints):
    return {name: (diffgemma.load(path), load_reference(path)) for name, path in generation_checkpoints.items()}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Our own random `tiny` preset (byte-level tokenizer, chat template), loaded."""
    from diffgemma.presets import random_checkpoint

    folder = random_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", preset="tiny", seed=3)
    model = diffgemma.load(folder)
    model.settings = model.settings.replace(max_denoising_steps=8)
    return model


DEMO = Path(__file__).parent / "assets" / "demo"


@pytest.fixture(scope="session")
def demo():
    """The trained demo model (tests/assets/make_demo_model.py): canned answers that really converge."""
    return diffgemma.load(DEMO)


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(owner, name) -> a list that grows by one at each call of owner.name, for this test."""

    def install(owner, name: str) -> list:
        calls = []
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
        return calls

    return install


@pytest.fixture(scope="session")
def digits_only_bans(demo) -> list[int]:
    """Every token of the demo model but the digits 1-9 and the EOS ids: banned, its replies are numbers, or
    empty."""
    tokenizer = demo.tokenizer
    keep = {tokenizer.encode(digit, add_special_tokens=False)[0] for digit in "123456789"}
    keep |= set(demo.settings.eos_token_id)
    return [token for token in range(demo.config.vocab_size) if token not in keep]


@pytest.fixture(scope="module")
def server(demo):
    """The demo model served over HTTP on 127.0.0.1 (small limits: prompts of 400 tokens, answers of 512): its URL
    and app."""
    app = create_app(demo, ServerOptions(model_name="demo", max_prompt_tokens=400, max_tokens=512))
    with running(app) as url:
        yield url, app
