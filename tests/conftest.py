import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from reference import load_reference, make_reference_checkpoint

import diffgemma

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference")
    return {name: make_reference_checkpoint(root / name, name, seed=i) for i, name in enumerate("AB")}


@pytest.fixture(scope="session")
def reference_models(reference_checkpoints):
    return {name: load_reference(path) for name, path in reference_checkpoints.items()}


@pytest.fixture(scope="session")
def ours(reference_checkpoints):
    return {name: diffgemma.load(path) for name, path in reference_checkpoints.items()}
