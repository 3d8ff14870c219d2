"""Tools around a backbone: FLOPs, benchmarks, export, attention maps (and evaluation, prediction)."""
