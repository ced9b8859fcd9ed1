"""Twin-Merging (Lu et al. 2024, arXiv:2406.15479): a searched merge as shared knowledge, each expert's
difference from it as low-rank exclusive parts, and a router that weights those parts per input."""
