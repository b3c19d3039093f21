"""ggtrain's command line (installed as ggtrain.cli; console script `ggtrain`)."""
