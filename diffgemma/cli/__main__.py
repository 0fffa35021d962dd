"""`python -m diffgemma.cli` (torchrun's way in: `torchrun --nproc_per_node N -m diffgemma.cli train ...`)."""

import sys

from . import main

sys.exit(main())
