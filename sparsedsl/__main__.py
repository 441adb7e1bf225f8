"""`python -m sparsedsl ...`: the same command line as the `sparsedsl` console script."""
import sys

from .cli import main

sys.exit(main())
