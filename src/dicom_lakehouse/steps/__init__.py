"""The job's steps: the step registry and the per-file work (listing, the local pool, the de-identification key)."""
