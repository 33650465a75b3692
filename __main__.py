"""``python -m cxr_transfer ...``: the same command line as the ``cxr-transfer`` script."""
import sys

from cxr_transfer.cli import main

sys.exit(main())
