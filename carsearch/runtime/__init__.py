"""Where and how a run executes, one concern a module, each imported on its own (nothing happens at import):
``device`` (the torch device), ``threads`` (CPU threads), ``versions`` (installed library versions),
``progress`` (the progress bar; no torch)."""
