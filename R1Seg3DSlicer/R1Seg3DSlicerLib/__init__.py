"""Helpers of the R1Seg3DSlicer module, kept out of the module file so they can be tested alone.

scene          MRML work: volume node <-> arrays, masks -> segments, terminology, views (slicer, vtk, numpy only)
provenance     each answer's provenance record, kept in the scene beside its segments (MRML only)
chat           the chat panel's state machine (plain Python)
worker         background thread with progress, cancel and an event queue (plain Python)
engine         the bridge to r1seg_core shared by the module's Logic and batch.py
server_process a local `r1seg serve` process the module starts and stops
server_client  questions answered by such a server, driven by the panel's timer
terminology    writes Resources/R1Seg3D.term.json from the vocabulary (plain Python)
i18n           Slicer's translation function, or English outside Slicer

Submodules are not imported here: the module file imports what it needs, when it needs it.
"""
