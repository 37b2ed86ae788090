"""`python -m poprt_lite.cli ...` runs the `poprt-lite` command (tests start servers this way)."""

import sys

from poprt_lite.cli.main import main

sys.exit(main())
