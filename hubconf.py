"""torch.hub entry points: every vitkit variant by its (timm) name.

    model = torch.hub.load("<owner>/vitkit", "deit_base_patch16_224", pretrained=True)
    model = torch.hub.load("path/to/vitkit", "swin_tiny_patch4_window7_224", source="local", num_classes=10)

Keyword arguments go to `vitkit.create_model` (`pretrained`, `num_classes`, `img_size`, any config field).
"""

import sys
from pathlib import Path

dependencies = ["torch", "torchvision", "safetensors"]

try:
    import vitkit
except ImportError:  # a hub checkout, not an installed package: import from its src/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    import vitkit


def _entry_point(name: str):
    def create(pretrained: bool = False, **kwargs):
        return vitkit.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = name
    create.__doc__ = f"vitkit.create_model({name!r}, pretrained=..., **kwargs)"
    return create


for _name in vitkit.list_models():
    globals()[_name] = _entry_point(_name)
del _name
