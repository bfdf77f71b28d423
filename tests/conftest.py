"""Shared test setup: point the legacy-transformers parity tests at the side folders .ci/run
installs, when they exist in this checkout and the environment does not name others."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for env, folder in (("EDGEJUDGE_TF_LEGACY", "transformers-4.57.6"), ("EDGEJUDGE_TF_QWEN35", "transformers-5.2.0")):
    if not os.environ.get(env) and (ROOT / ".ci-cache" / folder).is_dir():
        os.environ[env] = str(ROOT / ".ci-cache" / folder)
