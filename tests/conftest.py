"""Shared test setup: point the legacy-transformers parity tests at the side folders .ci/run
installs, when they exist in this checkout and the environment does not name others."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for env, folder in (("EDGEJUDGE_TF_LEGACY", "transformers-4.57.6"), ("EDGEJUDGE_TF_QWEN35", "transformers-5.2.0")):
    if not os.environ.get(env) and (ROOT / ".ci-cache" / folder).is_dir():
        os.environ[env] = str(ROOT / ".ci-cache" / folder)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny torch models are overhead-bound: one thread is faster, and far faster on a busy CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
