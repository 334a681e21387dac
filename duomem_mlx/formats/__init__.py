"""On-disk formats, the only hand-off between stages: one module per artefact, its reader and writer."""
