"""`python -m lorabox.env`: same as `lorabox env`."""

import sys

from lorabox.env.cli import main

sys.exit(main())
