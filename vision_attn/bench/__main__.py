"""Entry point: ``python -m vision_attn.bench <what> [options]``."""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = {
    "ablation": "vision_attn.bench.ablation",
    "attention": "vision_attn.bench.attention",
    "model": "vision_attn.bench.model",
    "data": "vision_attn.bench.data",
    "erf": "vision_attn.bench.erf",
    "knobs": "vision_attn.bench.knobs",
    "gpu": "vision_attn.bench.gpu",
    "resolution": "vision_attn.bench.resolution",
    "routes": "vision_attn.bench.routes",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vision_attn.bench", description=__doc__)
    parser.add_argument("what", choices=sorted(BENCHES), help="which benchmark to run (then its own --help)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHES:  # `-h`, a typo or nothing: this parser explains
        parser.parse_args(argv)
    args, rest = parser.parse_args(argv[:1]), argv[1:]  # the rest, `--help` included, is the bench's
    try:
        module = importlib.import_module(BENCHES[args.what])
    except ModuleNotFoundError as e:
        if e.name != BENCHES[args.what]:
            raise
        parser.error(f"benchmark {args.what!r} is not implemented yet ({BENCHES[args.what]})")
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
