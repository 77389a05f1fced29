"""jaxpeft.adapters."""
