"""Data for distillation demos: procedural images with known content, and optional photographs."""
