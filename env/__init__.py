"""lorabox.env: what each environment pins and needs, which one fits a machine, and the image builder.

Imports neither `verify` nor `train`, and nothing heavy at import time (no torch)."""
