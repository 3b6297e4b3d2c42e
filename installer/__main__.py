"""`python -m installer`: what the installer files (build.py) run once unpacked."""

import sys

from installer.install import main

sys.exit(main())
