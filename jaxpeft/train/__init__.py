"""jaxpeft.train."""
