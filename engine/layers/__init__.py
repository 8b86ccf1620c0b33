"""Building blocks the models are written against."""
