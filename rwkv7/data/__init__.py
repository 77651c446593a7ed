"""Token data: binidx files, the official sampler, generated and downloaded corpora."""
