"""jaxpeft.optim."""
