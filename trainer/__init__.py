"""Trainer (middle floor): teacher, student, losses, the task, the loop, evaluation, mining and teacher labels."""
