"""`python -m expkit` is the `expkit` command."""

import sys

from expkit.cli import main

sys.exit(main())
