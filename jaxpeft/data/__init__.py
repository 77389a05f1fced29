"""jaxpeft.data."""
