"""attnzoo: a declarative model zoo of attention mechanisms for vision.

    import attnzoo
    model = attnzoo.create_model("resnet50_cbam")

This module only re-exports. Importing it registers the catalogue (every block in
``attnzoo.blocks``, every architecture in ``attnzoo.architectures``) and every zoo
spec as a timm model name.
"""

from . import architectures, blocks  # noqa: F401  (registration: the catalogue)
from ._version import __version__
from .any_model import insert, list_sites
from .builder import (
    build_model,
    convert_sync_batchnorm,
    create_block,
    list_blocks,
    reattach_blocks,
)
from .errors import AttnZooError, SpecError, WeightsError
from .hub import push_to_hub
from .inserted import load_inserted
from .manifests import list_pretrained
from .pretrained import create_model
from .registry import register_architecture, register_block
from .saved import save_pretrained
from .spec import ModelSpec
from .timm_registry import register_zoo_with_timm
from .zoo import list_models, load_spec

__all__ = [
    "AttnZooError", "ModelSpec", "SpecError", "WeightsError", "__version__", "build_model",
    "convert_sync_batchnorm", "create_block", "create_model", "insert", "list_blocks",
    "list_models", "list_pretrained", "list_sites", "load_inserted", "load_spec", "push_to_hub",
    "reattach_blocks", "register_architecture", "register_block", "save_pretrained",
]

# Every zoo spec becomes a timm model name (reads the spec files; builds nothing).
register_zoo_with_timm()

#: Submodules the docs name (``attnzoo.convert.from_timm``, the catalogue packages).
_PUBLIC_MODULES = ["architectures", "blocks", "convert"]


def __dir__() -> list[str]:
    """The public API only: ``dir(attnzoo)`` and tab completion show ``__all__`` and the
    documented submodules, not the names the package imports for itself."""
    return sorted([*__all__, *_PUBLIC_MODULES])
