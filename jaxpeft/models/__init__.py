"""jaxpeft.models."""
