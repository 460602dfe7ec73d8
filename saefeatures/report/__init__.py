"""Presentation: every figure and HTML rendering of a run (the numbers come from the layers below)."""
