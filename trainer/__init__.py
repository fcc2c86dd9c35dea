"""Trainer: teacher, student, losses, the task, the loop, evaluation and the CLI."""
