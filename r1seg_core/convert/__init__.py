"""Converting the authors' released R1Seg-3D checkpoints (and SegVol's encoder) into this project's model folders,
and replaying the compatibility vectors on a converted model (`r1seg convert`, `r1seg compat-run`).

See README.md in this folder for downloading and converting the published weights.
"""
from .keymaps import SOURCE_KINDS

__all__ = ["SOURCE_KINDS"]
