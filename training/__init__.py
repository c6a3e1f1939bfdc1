"""Training of derestore's compact offline models (not shipped in the wheel); see MODELS.md."""
