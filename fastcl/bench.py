"""``python -m fastcl.bench``: fastcl's performance report (``benchmarks/report.py``).

The report reuses the benchmark harness of a source checkout (``benchmarks/`` next to the
package: a clone, or an editable install); it is not part of an installed wheel. See
``benchmarks/report.py`` for the cases, columns and options.
"""
from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(here, "benchmarks")
    if not os.path.isfile(os.path.join(bench_dir, "report.py")):
        print("fastcl.bench needs a source checkout of fastcl (benchmarks/report.py next to "
              "the package); clone the repository and run it from there", file=sys.stderr)
        return 2
    sys.path.insert(0, bench_dir)
    import report

    return report.main(argv)


if __name__ == "__main__":
    sys.exit(main())
