"""`torchrun --nproc-per-node P -m engines.distributed generate|bench ...` (see engines/distributed/cli.py)."""

import sys

from engines.distributed.cli import main

sys.exit(main())
