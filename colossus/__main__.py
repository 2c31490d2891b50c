"""`python -m colossus` is the `colossus` command."""

import sys

from colossus.cli import main

sys.exit(main())
