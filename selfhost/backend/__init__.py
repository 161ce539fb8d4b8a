"""Backends apply a compiled plan to a host. The only one is pyinfra (:mod:`.pyinfra`)."""
