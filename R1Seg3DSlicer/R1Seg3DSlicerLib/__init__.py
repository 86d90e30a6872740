"""Helpers of the R1Seg3DSlicer module, kept out of the module file so they can be tested alone.

scene          MRML work: volume node <-> arrays, masks -> segments, terminology, views (slicer, vtk, numpy only)
provenance     each answer's provenance record, kept in the scene beside its segments (MRML only)
chat           the chat panel's state machine (plain Python)
events         what a question reports to the panel: progress, then finished, failed or cancelled
engine         the bridge to r1seg_core shared by the module's Logic and batch.py
setup_step     the first-use set-up: one consent, one progress dialog, for everything that must be installed
model_card     the model's card, licence and caveat, from its folder or from the server
process_tree   start a process in a group of its own and end the whole tree (PythonSlicer is a launcher)
connection     the client/server contract: API version check, 409 and 413 answers, https for remote servers
server_process a local `r1seg serve` process the module starts and stops, with its log kept when it fails
server_client  questions answered by such a server, driven by the panel's timer
server_session the panel's one way to run questions: a local or remote server, its conversations and CTs
terminology    writes Resources/R1Seg3D.term.json from the vocabulary (plain Python)
i18n           Slicer's translation function, or English outside Slicer

Submodules are not imported here: the module file imports what it needs, when it needs it.
"""
