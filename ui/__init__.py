"""Gradio demo, talking to Serve over HTTP."""
