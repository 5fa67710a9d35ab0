"""`dreamer4 play`: a local server and one plain HTML/JS page to play Craftax inside a run's world
model, beside the real game in lockstep, hand over to the run's agent, and record human play as
labeled data. session.py (models, game, recording; no HTTP), server.py (HTTP, validation, the
command), record.py (dataset commits), keys.py (Craftax's key bindings), static/ (the page)."""
