"""The seed paper's memory figures (Back Razor, NeurIPS 2022, appendix B), to print beside ours.

All are GPU training memory in MB as the paper reports them. Tables 3 and 5 are for a
CNN (ProxylessNAS-Mobile), not a ViT; our side of those rows is the ViT closest in
size (ViT-Ti/16, 5.7M parameters) at the same batch size.
"""

# Table 1: ViT-L/16, batch 128 (measured on CIFAR-100); top-1 on CUB-200 and Flowers-102.
TABLE1 = {
    "model": "L/16", "batch": 128,
    "full_mb": 51257.0, "razor_mb": 12270.4, "razor_prune_ratio": 0.9,
    "accuracy": {"full": {"CUB200": 86.6, "Flowers": 99.6},
                 "razor@0.9": {"CUB200": 86.9, "Flowers": 99.5}},
}

# Table 5: on-device memory of ProxylessNAS-Mobile (CIFAR-100), full vs Back Razor@90%.
TABLE5 = {"model": "ProxylessNAS-Mobile",
          "rows": {8: {"full_mb": 1655.0, "razor_mb": 1637.0},
                   128: {"full_mb": 7393.0, "razor_mb": 6634.0}}}

# Table 3: batch 1, ProxylessNAS on Flowers. The extracted text lost the row labels of
# the first two rows (TinyTL variants); the last row is Back Razor.
TABLE3 = {"model": "ProxylessNAS", "batch": 1,
          "rows": [("(row label lost in extraction)", 34.0, 96.4),
                   ("(row label lost in extraction)", 18.0, 96.1),
                   ("Back Razor", 15.0, 96.4)]}

# Table 4 (B.4): SGD on Flowers with ProxylessNAS: full 366 MB / 97.1, razor@0.8 42 MB / 96.7.
TABLE4 = {"full": (366.0, 97.1), "razor@0.8": (42.0, 96.7)}

MB = 2**20  # the paper's MB are taken as MiB (as PyTorch's memory counters report them)
