"""Offline stand-ins for the real thing: a demo corpus and a tiny GLM-4.5-Air-shaped model."""
