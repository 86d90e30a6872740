"""Which body regions a scan covers, and which absent targets lie inside or outside them (body_regions.json).

A region counts as scanned when a structure listed under that region alone is present in the label. An absent
target is "in the scanned region" when one of its regions is scanned and "outside" when none is. When no present
structure has a single region (a tumour-only label, say), the scanned regions are unknown and no target is asked
as absent outside them.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

_TABLE = Path(__file__).resolve().parent / "body_regions.json"
REGIONS = ("head", "neck", "thorax", "abdomen", "pelvis", "limbs")


@lru_cache(maxsize=1)
def body_regions() -> dict[str, frozenset[str]]:
    """Structure name -> the regions it lies in."""
    regions: dict[str, set[str]] = {}
    for region, names in json.loads(_TABLE.read_text())["regions"].items():
        for name in names:
            regions.setdefault(name, set()).add(region)
    return {name: frozenset(found) for name, found in regions.items()}


def scanned_regions(present) -> set[str]:
    table = body_regions()
    return {next(iter(table[name])) for name in present if len(table.get(name, ())) == 1}


def absent_targets(present, annotated, vocabulary_names) -> tuple[list[str], list[str]]:
    """(absent in the scanned region, absent outside it), each in vocabulary order.

    Inside: only structures the label annotates, so "absent" is the ground truth and not a gap in the annotation.
    Outside: any vocabulary structure of a region the scan does not reach.
    """
    table, present = body_regions(), set(present)
    scanned = scanned_regions(present)
    annotated_absent = set(annotated) - present
    inside = [name for name in vocabulary_names
              if name in annotated_absent and table.get(name, frozenset()) & scanned]
    outside = [name for name in vocabulary_names
               if scanned and name not in present and table.get(name) and not table[name] & scanned]
    return inside, outside
