"""``python -m torchreid_vi``: the command line (see :mod:`torchreid_vi.cli`)."""
import sys

from .cli import main

sys.exit(main())
