"""Launch scripts."""
