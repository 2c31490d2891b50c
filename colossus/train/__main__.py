"""`python -m colossus.train ...` is `colossus train ...`."""

import sys

from colossus.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
