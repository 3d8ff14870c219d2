"""Model families; importing this package registers every variant."""

from vitkit.models import swin, vit  # noqa: F401  imported for their registrations
