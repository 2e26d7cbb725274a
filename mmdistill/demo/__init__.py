"""The embedded demo: a small multimodal teacher trained on generated shapes (see teacher.py)."""
