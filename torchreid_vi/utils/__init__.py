"""Small shared pieces used across the package: distances, atomic file writes, state-dict
matching and model unwrapping / distributed helpers. Each exists once, here."""
