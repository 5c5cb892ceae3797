"""Pattern finders the passes share: each walks the fx graph and returns a
match or the reason there is none; rewriting stays with the pass."""
