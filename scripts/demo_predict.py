"""Run one model on one image (until the training demo lands)."""

import torch

import vitkit

torch.manual_seed(0)
model = vitkit.create_model("deit_tiny_patch16_224").eval()
image = torch.rand(1, 3, 224, 224)
with torch.no_grad():
    probs = model(image).softmax(-1)
top = probs.topk(3)
print(f"deit_tiny_patch16_224 (random weights) on a random image: top-3 classes {top.indices[0].tolist()}, "
      f"probabilities {[round(p, 4) for p in top.values[0].tolist()]}")
