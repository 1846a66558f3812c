"""`python -m xstilts.demo [--root DIR]`: prepare the demo world (task files and pretrained
tiny models), reusing what is cached. `make demo` runs this, then `xstilts run` and
`xstilts report` on examples/demo.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xstilts.demo.prepare import DEFAULT_ROOT, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xstilts.demo", description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help=f"where the data and models go (default: {DEFAULT_ROOT})")
    args = parser.parse_args(argv)
    print(f"Preparing the demo world under {args.root}/ (cached after the first run)", flush=True)
    done = prepare(args.root, log=lambda line: print(f"  {line}", flush=True))
    sizes = ", ".join(f"{name} {r['parameters']:,} parameters" for name, r in done.models.items())
    print(f"Ready in {done.seconds:.0f}s: {sizes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
