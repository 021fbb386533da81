"""``python -m medseg``: the ``medseg`` command (also ``torchrun --nproc_per_node=N -m medseg train ...``)."""

import sys

from medseg.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
