"""The lab's Gradio Tip-Adapter demo: ``from app.main import build_demo``."""
