"""The lab's Gradio classroom demo, one tab per method: ``from app.main import build_demo``."""
