"""Model execution on one tensor-parallel rank: models, checkpoint loading, sampling."""
