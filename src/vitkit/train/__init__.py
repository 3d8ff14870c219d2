"""Supervised training: config, recipes, the engine, the run loop, optimisers, losses, distillation and
several processes."""
