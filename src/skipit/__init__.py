"""skipit: label-free conditions for skipping layers of vision-language models, and the tools to apply them."""

from skipit.errors import SkipitError
from skipit.models import load

__all__ = ["SkipitError", "load"]
__version__ = "0.1.0"
