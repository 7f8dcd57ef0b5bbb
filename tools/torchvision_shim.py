"""Dev/CI-only shim: lets PyPI's CUDA torchvision import next to the CPU build of torch.

PyPI ships torchvision only as a CUDA build. Next to CPU torch its C++ extension fails to load, and
``import torchvision`` then dies with ``RuntimeError: operator torchvision::nms does not exist`` (which also breaks
``peft`` and ``open_clip`` through transformers). Running this file installs a ``.pth`` import hook into the active
environment. The hook waits until ``torchvision`` is first imported, tries to load torchvision's own extension, and
only if that fails declares the schemas of the ops torchvision registers fake kernels for at import time.
Where the real extension loads (a matching CUDA install) the hook does nothing. torchvision's C++ ops and
``torchvision.io`` stay unavailable on CPU; transforms, models and everything open_clip/timm/peft need work.

Usage: ``python tools/torchvision_shim.py`` (the Makefile does it when it creates ``.venv``).
"""

import pathlib
import sys
import sysconfig

HOOK = '''"""Installed by diffusers-pafm tools/torchvision_shim.py (dev/CI only)."""
import importlib.abc
import importlib.machinery
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
)
_LIBRARY = []  # keeps the torch.library.Library alive


def _declare_missing_ops(package_dir):
    import glob
    import os

    import torch

    for lib in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(lib)
            return  # the real extension works: nothing to do
        except (OSError, ImportError, RuntimeError):
            pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _LIBRARY.append(library)


class _TorchvisionShimFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.submodule_search_locations:
            _declare_missing_ops(list(spec.submodule_search_locations)[0])
        return spec


sys.meta_path.insert(0, _TorchvisionShimFinder())
'''


def main() -> None:
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    (site / "_pafm_torchvision_shim.py").write_text(HOOK)
    (site / "_pafm_torchvision_shim.pth").write_text("import _pafm_torchvision_shim\n")
    print(f"installed torchvision op-schema shim into {site} ({sys.executable})")


if __name__ == "__main__":
    main()
