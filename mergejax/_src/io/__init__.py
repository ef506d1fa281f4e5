"""Checkpoint IO (private; public names are re-exported from `mergejax.io`)."""
