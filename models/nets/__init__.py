"""Network building blocks shared by the studies."""
