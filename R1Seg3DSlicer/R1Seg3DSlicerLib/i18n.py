"""Slicer's translation function for the user-facing texts of the Lib.

Each file binds it as `_` (`from .i18n import tr as _`) and wraps its texts in `_("...")`, the form Slicer's
translation tools collect. Inside Slicer this is `slicer.i18n.tr` itself, which takes the translation context
from the calling file (e.g. "R1Seg3DSlicerLib.chat"). Outside Slicer (the slicer-core wheel, batch.py under plain
Python) there is no slicer.i18n and the texts stay in English.
"""

try:
    from slicer.i18n import tr
except ImportError:

    def tr(text: str) -> str:
        return text
