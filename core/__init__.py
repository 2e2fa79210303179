"""The bottom layer: what every other package may import, and which imports nothing else of the project."""
