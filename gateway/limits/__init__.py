"""Server limits (`limits:` in the YAML): what one client may hold of a gateway worker.

- `protocol.py`: uvicorn's httptools protocol with header/body read timeouts, header size and
  count limits (408, 431) and a cap on open connections (503, closed at once).
- `admission.py`: caps on requests in flight, for the worker (503) and per API key (429), and
  on the worker's event-loop lag (503; measured by `loop_lag.py`).
- `routing_slots.py`: a cap on requests tokenized and looked up at once (503).
- `open_files.py`: the open-file limit raised at start-up, and the caps fitted to it.

Everything is per worker process; `Rejections` counts what was refused, by reason.
"""
