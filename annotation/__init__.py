"""Annotation workspace: a real Argilla server, the preference dataset, push/pull and agreement."""
