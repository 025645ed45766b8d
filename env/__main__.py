"""`python -m lorabox.env`: same as `lorabox env`."""

import sys

from lorabox.env.cli import main, quiet_on_closed_pipe

sys.exit(quiet_on_closed_pipe(main))
