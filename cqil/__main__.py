"""`python -m cqil ...` is the `cqil` command."""

import sys

from cqil.pipeline.cli import main

sys.exit(main())
