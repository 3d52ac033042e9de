"""`python -m agent` runs the tweed daemon."""

import sys

from agent.cli import main

sys.exit(main())
