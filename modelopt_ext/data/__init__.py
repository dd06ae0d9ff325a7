"""Training data: conversations -> token ids + assistant loss mask (cached), and the draft vocabulary."""
