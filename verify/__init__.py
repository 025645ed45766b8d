"""lorabox.verify: prove an environment works (GPU, driver, imports, bitsandbytes kernels, allocation, host, fit)."""
