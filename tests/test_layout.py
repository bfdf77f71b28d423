"""The runtime ships to robots without the training stack: importing it must not load torch."""

import subprocess
import sys

RUNTIME_MODULES = ("compat", "model", "mrope", "preprocess", "prompt", "qwen2_5_vl", "qwen3_5", "qwen3_vl",
                   "resize", "video", "vision", "decoder", "vision_qwen2_5", "engine", "answers")


def test_runtime_imports_no_training_stack():
    code = (
        "import sys\n"
        + "".join(f"import edgejudge.runtime.{m}\n" for m in RUNTIME_MODULES)
        + "import edgejudge.specs, edgejudge.cli, edgejudge.errors\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'torchvision', 'av') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "", f"runtime imported {proc.stdout.strip()}"


def test_package_mapping():
    import edgejudge.export
    import edgejudge.runtime

    assert edgejudge.runtime.__file__.replace("\\", "/").endswith("runtime/__init__.py")
    assert edgejudge.export.__file__.replace("\\", "/").endswith("export/__init__.py")
