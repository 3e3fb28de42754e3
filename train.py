"""Entry point for `python train.py --config C [section.key=value ...]` and `accelerate launch train.py ...`."""

import sys

from cogft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
