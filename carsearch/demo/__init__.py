"""The Gradio demo: ``handlers`` (plain functions over the pipeline) and ``app`` (layout and wiring)."""
