"""Model families; importing this package registers every variant."""

from vitkit.models import vit  # noqa: F401
from vitkit.models import swin  # noqa: F401
