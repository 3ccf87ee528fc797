"""Human review: the append-only review events, their application (the review sensor), the
reviewer's queue with leases, and the review web page."""
