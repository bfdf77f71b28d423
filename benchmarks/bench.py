"""`edgejudge bench` from a checkout that is not installed (the lent GPU machine):

    PYTHONPATH=/tmp/site python3 benchmarks/bench.py --workload W1 --random-weights --out $OUT [...]

The arguments are the command's (`edgejudge bench --help`). An installed edgejudge is used when
there is one; otherwise the checkout's folders are mapped the way pyproject.toml maps them
(edgejudge/, with runtime/ and export/ as edgejudge.runtime and edgejudge.export).
"""

import importlib.util
import sys
from pathlib import Path

try:
    import edgejudge.runtime  # noqa: F401
except ImportError:
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("edgejudge", root / "edgejudge" / "__init__.py",
                                                  submodule_search_locations=[str(root / "edgejudge"), str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["edgejudge"] = package
    spec.loader.exec_module(package)

from edgejudge.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
