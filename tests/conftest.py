"""Tests run offline, on the CPU, in fast mode."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("LABKIT_FAST", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("LABKIT_DEVICE", "cpu")

# One intra-op thread: tests share 2 cores with app servers and torchrun workers they start, and torch's
# spinning thread pool slows to a crawl when oversubscribed (a step went from 17 ms to seconds here).
os.environ.setdefault("OMP_NUM_THREADS", "1")
