"""One module per pass; each exposes ``run(graph_or_program, ctx) -> stats``."""
