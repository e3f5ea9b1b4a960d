import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import sae_ext  # noqa: E402,F401  (registers the plugin architectures)
from sae_ext.testing import random_token_dataset, tiny_hooked_transformer  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_hooked_transformer()


@pytest.fixture(scope="session")
def token_dataset():
    return random_token_dataset()
