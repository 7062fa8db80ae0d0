"""`python -m flows.cli ...` is the `storymem` command."""
import sys

from flows.cli import main

sys.exit(main())
