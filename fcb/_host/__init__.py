"""The host layer: one copy of every host-side rule the adapters share."""
