"""piggyback-serve's HTTP service: many Piggyback tasks on one shared backbone."""
