"""Helpers of the R1Seg3DSlicer module, kept out of the module file so they can be tested alone.

scene   MRML work: volume node <-> arrays, masks -> segments, terminology, views (slicer, vtk, numpy only)
chat    the chat panel's state machine (plain Python)
worker  background thread with progress, cancel and an event queue (plain Python)
engine  the bridge to r1seg_core shared by the module's Logic and batch.py
terminology  writes Resources/R1Seg3D.term.json from the vocabulary (plain Python)

Submodules are not imported here: the module file imports what it needs, when it needs it.
"""
