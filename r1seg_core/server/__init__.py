"""`r1seg serve`: the model in its own long-running process, reached over HTTP.

- `protocol`: the wire format both sides share (standard library only);
- `client`: the HTTP client of `r1seg ask --server`, `batch.py --server` and the Slicer module (standard
  library only, so Slicer's Python needs no extra package to talk to a server);
- `jobs`: the model host and the one-question-at-a-time job queue;
- `app`: the FastAPI application and `r1seg serve`.

Nothing is imported here: importing the client must not pull in FastAPI or torch.
"""
