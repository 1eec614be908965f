# SPDX-License-Identifier: Apache-2.0
"""``python -m attncore`` -- the command line (see attncore/cli.py)."""
from .cli import main

raise SystemExit(main())
