"""Everything that says "no" before a request reaches inside: what a message may hold."""
