"""The pneumonia model: its preprocessing contract, architecture, card and serving runtime."""
