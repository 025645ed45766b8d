"""`python -m env`: same as `lorabox env`."""

import sys

from env.cli import main

sys.exit(main())
