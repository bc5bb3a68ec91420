"""Reports on an embedding space (`embedline diagnose`, `embedline plot-space`): measures, named pathologies
with their usual fix, and 2-D pictures."""
