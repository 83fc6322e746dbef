"""``python -m clat ...`` (and ``torchrun --nproc_per_node N -m clat train ...``)."""

import sys

from clat.cli.main import main

sys.exit(main())
