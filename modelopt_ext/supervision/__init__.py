"""Supervision sources: everything the trainer consumes is one `Supervision` batch, whatever its source."""
